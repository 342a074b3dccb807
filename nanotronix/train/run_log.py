"""What the training loop reports for its steps: each logged step's metrics record (metrics.jsonl, TensorBoard) and
console line, and the bookkeeping behind them since the last record: tokens/s, MFU (from the steps' attention span
under document masking), and the slowest rank's wait for its batches."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from nanotronix.cli import replace_file
from nanotronix.config import Config, dump_config
from nanotronix.console import say
from nanotronix.train.flops import device_peak_tflops, document_attention_span, flops_per_token, mfu
from nanotronix.train.metrics import (MetricsLog, Throughput, console_line, mean_over_ranks, peak_memory_gb,
                                      slowest_rank)
from nanotronix.train.step import StepResult
from nanotronix.train.validation import mean_loss


class RunLog:
    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device, first_step: int):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.metrics = MetricsLog(cfg, enabled=rank == 0, first_step=first_step)
        self.speed = Throughput()
        self.peak = device_peak_tflops(device, cfg.train.dtype)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.spans: list[float] = []  # under document masking: each step's attention span, since the last record
        self.data_wait, self.steps = 0.0, 0  # seconds the trained steps since the last record waited for a batch

    def config_used_from(self, first_step: int) -> None:
        """Rank 0 writes LOGGING_DIR/config/step_NNNNNNN.yaml: the whole config that trains the steps from
        `first_step` on (defaults, preset and overrides applied), one file per start, so every step of metrics.jsonl
        can be matched to the config that trained it (a requeue may have changed OVERRIDES). A restart from the same
        step replaces it."""
        if self.rank == 0:
            path = Path(self.cfg.logging.dir) / "config" / f"step_{first_step:07d}.yaml"
            replace_file(path, lambda temp: Path(temp).write_text(dump_config(self.cfg)))

    def batch_read(self, waited: float, batch: torch.Tensor) -> None:
        """A step's batch arrived after `waited` seconds (~0 while the read-ahead keeps up)."""
        self.data_wait += waited
        self.steps += 1
        eos = self.cfg.model.document_mask_eos_id
        if eos is not None:  # attention FLOPs depend on the documents' lengths
            self.spans.append(document_attention_span(batch[..., :-1], eos))

    def trained(self) -> None:
        self.speed.add(self.tokens_per_step)

    def paused(self):
        """Leave the time spent inside out of tokens/s (validation, writing a profile)."""
        return self.speed.paused()

    def step(self, step: int, lr: float, result: StepResult, data_stats: dict[str, Any],
             val_losses: Optional[dict[str, float]]) -> None:
        """The record of a trained step: loss, throughput, MFU, data, memory (and validation, a skipped update)."""
        t, m = self.cfg.train, self.cfg.model
        rate = self.speed.rate()
        # Under document masking, the span of the whole global batch: each data-parallel rank saw only its share (a
        # rank's batch is replicated over its TP and PP peers, the same number of times for every share)
        span = mean_over_ranks(sum(self.spans) / len(self.spans), self.device) if self.spans else None
        flops_token = flops_per_token(m, t.seq_len, span)
        per_gpu = rate / self.world_size if rate else None
        record = {
            "step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
            "consumed_tokens": self._consumed_tokens(step, data_stats), "tokens_per_sec": rate,
            "tokens_per_sec_per_gpu": per_gpu,
            "model_tflops_per_gpu": per_gpu * flops_token / 1e12 if per_gpu else None,
            "mfu": mfu(per_gpu, flops_token, self.peak) if per_gpu else None,
            "stage": data_stats.get("stage"), "datasets": data_stats.get("datasets"), "time": time.time(),
            "peak_memory_gb": peak_memory_gb(self.device),
        }
        # the slowest rank's wait: one rank's slow filesystem holds every rank back
        record["data_wait_ms"], record["data_wait_rank"] = slowest_rank(1e3 * self.data_wait / max(self.steps, 1),
                                                                        self.device)
        self.spans.clear()
        self.data_wait, self.steps = 0.0, 0
        if val_losses:
            record.update(val_loss=mean_loss(val_losses), val_losses=val_losses)
        if result.spike is not None:
            record["update_skipped"] = result.spike
        self._emit(record)

    def skipped(self, step: int, lr: float, data_stats: dict[str, Any], val_losses: dict[str, float]) -> None:
        """The record of a step in train.skip_steps that ran a validation (on the last trained step's weights), or
        that is a resumed run's first."""
        # every field a record holds, those of training null (nothing trained): a reader may take record["loss"]
        nothing = dict.fromkeys(("loss", "grad_norm", "tokens_per_sec", "tokens_per_sec_per_gpu",
                                 "model_tflops_per_gpu", "mfu", "peak_memory_gb", "data_wait_ms", "data_wait_rank"))
        record = {"step": step, "skipped": True, **nothing, "lr": lr,
                  "consumed_tokens": self._consumed_tokens(step, data_stats), "stage": data_stats.get("stage"),
                  "datasets": data_stats.get("datasets"), "time": time.time()}
        if val_losses:
            record.update(val_loss=mean_loss(val_losses), val_losses=val_losses)
        self._emit(record)

    def _consumed_tokens(self, step: int, data_stats: dict[str, Any]) -> int:
        """Tokens of the samples consumed by the end of `step`: the datasets' counts, which a resume with another
        train.seq_len carries on from the checkpoint's (step x tokens per step would count the earlier steps at the
        new length)."""
        datasets = data_stats.get("datasets")
        if datasets:
            return sum(d["consumed_tokens"] for d in datasets.values())
        return step * self.tokens_per_step

    def _emit(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if self.rank == 0:
            say(console_line(record, self.cfg.train.train_steps, self.tokens_per_step))

    def close(self) -> None:
        self.metrics.close()
