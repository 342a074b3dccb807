"""metrics.jsonl writer (one JSON object per logged step, rank 0 only), throughput bookkeeping, and the peak GPU
memory over all ranks."""
from __future__ import annotations

import contextlib
import json
import stat
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from nanotronix.config import Config
from nanotronix.errors import UserError


def check_metrics_file(logging_dir: str) -> None:
    """A UserError where LOGGING_DIR/metrics.jsonl is a folder, a FIFO or a socket: no record could ever be appended
    and read back, so it is said before step 1 (by the run, and by the launch preflight at submission), not warned
    at every record."""
    path = Path(logging_dir) / "metrics.jsonl"
    if path.is_dir():
        raise UserError(f"logging.dir: {path} is a folder: rank 0 appends the metrics records to a file of that name")
    if path.exists() and not path.is_file() and not path.is_char_device():  # a device: /dev/null, taken as asked
        raise UserError(f"logging.dir: {path} is a FIFO or socket: rank 0 appends the metrics records to a file of "
                        "that name and reads its end back on a resume")


class MetricsLog:
    """Where rank 0's records go: metrics.jsonl, and TensorBoard and W&B when the config asks for them."""

    def __init__(self, cfg: Config, enabled: bool, first_step: int = 1):
        self.enabled = enabled
        self.path = Path(cfg.logging.dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        self._failing = False  # the last write to metrics.jsonl failed (a full disk): warned once
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                check_metrics_file(cfg.logging.dir)
                self._open_loggers(cfg, first_step)
            except UserError as e:  # rank 0's alone: the ranks it stops at their next collective keep quiet
                e.said_for_the_stopped = True
                raise

    def _open_loggers(self, cfg: Config, first_step: int) -> None:
        """TensorBoard and W&B, where the config asks for them (rank 0)."""
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard: needs the tensorboard package (pip install "
                                "tensorboard)") from None
            # A resume re-trains the steps after its checkpoint that the stopped run had logged: TensorBoard
            # drops those earlier points (purge_step), or its curves would hold both runs' values of each step.
            folder = self.path.parent / "tensorboard"
            try:
                self._tb = SummaryWriter(str(folder), purge_step=first_step if first_step > 1 else None)
            except OSError as e:  # a file of that name (makedirs' FileExistsError): one line, before step 1
                raise UserError(f"logging.tensorboard: cannot write {folder} ({e.strerror or e})") from None
        if cfg.logging.wandb_project is not None:
            from nanotronix.train.wandb_log import WandbLog
            self._wandb = WandbLog(cfg.logging, cfg.to_dict())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append(json.dumps(record) + "\n", record["step"])
        if self._tb is not None:
            for k, v in _scalars(record):
                self._tb.add_scalar(k, v, record["step"])
        if self._wandb is not None:
            self._wandb.log(dict(_scalars(record)))

    def _append(self, line: str, step: int) -> None:
        """One line onto metrics.jsonl. A log disk that fills up (or fails) mid-run does not stop the training (the
        checkpoints are what a run must not lose): one warning, the line dropped whole (no partial line for readers
        to trip on), and the next records are tried again. A file that does not end with a line end (a job killed
        while writing its record, then resumed) gets one first: the record would else be glued onto the cut line,
        one line that no reader can parse."""
        data = line.encode()
        try:
            with self.path.open("a+b", buffering=0) as f:  # unbuffered: nothing left to flush at close
                size = f.seek(0, 2)
                if size:
                    f.seek(size - 1)  # to read the last byte: an append writes at the end wherever the file's offset
                    if f.read(1) != b"\n":
                        data = b"\n" + data
                try:
                    written = 0
                    while written < len(data):
                        written += f.write(data[written:])
                except OSError:
                    with contextlib.suppress(OSError):
                        f.truncate(size)
                    raise
        except OSError as e:
            if not self._failing:
                print(f"warning: step {step}: cannot write {self.path}: {e.strerror or e}; training goes on, "
                      "the metrics of the steps until it can be written again are not kept there", file=sys.stderr,
                      flush=True)
            self._failing = True
            return
        if self._failing:
            print(f"{self.path}: written again from step {step}", file=sys.stderr, flush=True)
        self._failing = False

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


class Throughput:
    """Tokens/s over the steps since the last report (wall clock, so data loading and logging count; the trainer
    leaves validation passes, checkpoint saves and profile writing out with `paused`)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        """Leave the time spent inside out of the rate (validation passes)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._t += time.perf_counter() - start

    def rate(self) -> Optional[float]:
        now = time.perf_counter()
        elapsed, tokens = now - self._t, self._tokens
        self._t, self._tokens = now, 0
        return tokens / elapsed if elapsed > 0 and tokens else None


def earlier_records_note(cfg: Config, resumed_step: int) -> Optional[str]:
    """What a run that starts from step 0 says when its logging.dir already holds records (another run's, or an
    earlier start of this one): its records are appended after them, which mixes two runs' curves in one file."""
    path = Path(cfg.logging.dir) / "metrics.jsonl"
    try:
        found = path.stat()
    except OSError:
        return None
    held = resumed_step == 0 and stat.S_ISREG(found.st_mode) and found.st_size > 0  # a folder there holds no records
    if not held:
        return None
    return (f"{path} already holds records (another run's, or this run's before it was restarted without a "
            "checkpoint): this run's are appended after them; a run of its own wants a logging.dir of its own")


def console_line(record: dict[str, Any], train_steps: int, tokens_per_step: int) -> str:
    """The log line of a metrics record: step, loss (and validation losses), lr, grad norm, tokens/s, MFU, memory,
    a slow rank's data wait, and the time left at this pace (of steps of `tokens_per_step` tokens: the run's now,
    not the average since step 1, which a resume with another seq_len changed);
    a skipped step's record (train.skip_steps: a validation's, or a resumed run's first) gets step, validation
    losses and lr."""
    skipped = record.get("skipped", False)
    parts = [f"step {record['step']:>6}/{train_steps}", "skipped" if skipped else f"loss {record['loss']:.4f}"]
    if record.get("val_losses"):
        parts[-1] += f" | val loss {record['val_loss']:.4f}"
        if len(record["val_losses"]) > 1:
            parts[-1] += " (" + ", ".join(f"{k} {v:.4f}" for k, v in record["val_losses"].items()) + ")"
    if skipped:
        return " | ".join(parts + [f"lr {record['lr']:.3e}"])
    parts += [f"lr {record['lr']:.3e}", f"grad norm {record['grad_norm']:.3f}",
              f"{record['tokens_per_sec'] or 0:,.0f} tok/s"]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("peak_memory_gb") is not None:
        parts.append(f"{record['peak_memory_gb']:.1f} GB")
    step_ms = 1e3 * tokens_per_step / record["tokens_per_sec"] if record.get("tokens_per_sec") else None
    if step_ms and record.get("data_wait_ms", 0) > 0.05 * step_ms:  # the input is too slow somewhere: say where
        parts.append(f"data wait {record['data_wait_ms']:.0f} ms/step (rank {record['data_wait_rank']})")
    if step_ms and record["step"] < train_steps:  # at the pace of the steps since the last record
        parts.append(f"ETA {_duration((train_steps - record['step']) * step_ms / 1e3)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    """3d 04h, 2h 05m, 7m 09s: the two largest units."""
    minutes = int(seconds // 60)
    days, hours, minutes = minutes // 1440, minutes // 60 % 24, minutes % 60
    if days:
        return f"{days}d {hours:02d}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {int(seconds) % 60:02d}s"


def _scalars(record: dict[str, Any], prefix: str = ""):
    """(name, number) of every numeric field, nested ones named by their path (val_losses/web,
    datasets/web/epochs)."""
    for k, v in record.items():
        if isinstance(v, dict):
            yield from _scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def slowest_rank(value: float, device: torch.device) -> tuple[float, int]:
    """The largest of every rank's `value` and the rank it comes from (collective: every rank calls it at the same
    steps). The job goes at its slowest rank's pace, so that rank, not rank 0, is the one to look at."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value, 0
    values = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    values[dist.get_rank()] = value
    dist.all_reduce(values)  # each rank fills its own slot: the sum is every rank's value
    rank = int(values.argmax())
    return values[rank].item(), rank


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of every rank's `value` (collective: every rank calls it at the same steps)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def peak_memory_gb(device: torch.device) -> Optional[float]:
    """The largest GPU memory any rank has allocated since the last call, in GB (collective on CUDA: every rank
    calls it at the same steps); None on CPU."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device)], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    torch.cuda.reset_peak_memory_stats(device)
    return peak.item() / 1e9
