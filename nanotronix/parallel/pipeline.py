"""Run one step's micro-batches (forward + backward) through this rank's model chunks.

pp == 1: a plain loop, forward and backward per micro-batch.
pp > 1:  `torch.distributed.pipelining` runs the schedule: `PipelineStage` per chunk (stage index = global chunk
         id, placed on pipeline rank id % pp) and one of ScheduleGPipe (parallel.pp_schedule: afab),
         Schedule1F1B (1f1b) or ScheduleInterleaved1F1B (interleaved, virtual_stages chunks per rank). The last
         stage's loss function is the (vocab-parallel) cross entropy, so logits are never gathered, and the
         schedule does not scale gradients: the loss is pre-scaled by 1/(micro-batches * dp) so that the
         data-parallel sum is the global-batch mean, exactly as in the single-process run.
Both paths run backward once per micro-batch and chunk, which is what the data-parallel gradient hooks count.

`evaluate` runs the same micro-batches forward only (the schedule's `eval`, torch >= 2.9), for the validation loss:
rows whose labels are PAD_LABEL are padding and count for nothing.
"""
from __future__ import annotations

import inspect

import torch
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)

from nanotronix.model.loss import cross_entropy
from nanotronix.parallel.cross_entropy import head_and_loss, vocab_parallel_cross_entropy

SCHEDULES = {"afab": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}
PAD_LABEL = -1  # labels of a padding row in `MicroBatchRunner.evaluate`


def micro_batch_loss(logits: torch.Tensor, labels: torch.Tensor, tp_group) -> torch.Tensor:
    """Mean next-token loss of one micro-batch from (local-vocabulary) logits."""
    if tp_group is None:
        return cross_entropy(logits, labels)
    return vocab_parallel_cross_entropy(logits, labels, tp_group)


class MicroBatchRunner:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self._scale = 1.0
        self._evaluating = False
        self._stages = None
        self._schedules: dict[int, object] = {}

    def _loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._evaluating:
            return self._sum_of_row_losses(logits, labels)
        return self._mean_loss(logits, labels) * self._scale

    def _mean_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        last = self.model.chunks[-1]
        if last.fused_loss_chunk:  # `logits` is the final norm's output: the loss applies the head
            return head_and_loss(logits, last.lm_head, labels, last.fused_loss_chunk, last.compute_dtype,
                                 last.loss_compile, self.model.tp_group)
        return micro_batch_loss(logits, labels, self.model.tp_group)

    def _sum_of_row_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over the rows that are not padding of each row's mean loss: every row holds the same number of
        targets, so that is the rows' mean loss times their count. The same rows on every TP rank (the
        vocab-parallel loss is collective)."""
        real = labels[:, 0] != PAD_LABEL
        count = int(real.sum())
        if count == 0:
            return torch.zeros((), device=labels.device)
        if count < len(real):
            logits, labels = logits[real], labels[real]
        return self._mean_loss(logits, labels) * count

    def run(self, inputs: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
        """inputs/labels: [micro_batches, micro_batch_size, seq_len]. Returns the sum of this rank's scaled
        micro-batch losses (zero on ranks without the last chunk)."""
        self._scale = scale
        losses: list[torch.Tensor] = []
        if self.model.ctx.pp == 1:
            chunk = self.model.chunks[0]
            for x, y in zip(inputs, labels):
                loss = self._loss_fn(chunk(x), y)
                loss.backward()
                losses.append(loss.detach())
        else:
            # The schedule's own list: on its first step it also calls loss_fn once to infer shapes.
            self._run_pipeline(inputs, labels, losses)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([loss.detach() for loss in losses]).sum()

    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward only, without gradients. inputs/labels: [micro_batches, micro_batch_size, seq_len], as in `run`
        (the same number of micro-batches, so the training step's pipeline schedule serves); rows whose labels
        are PAD_LABEL are padding. Returns the sum over the other rows of each row's mean loss (zero on ranks
        without the last chunk)."""
        losses: list[torch.Tensor] = []
        self._evaluating = True
        try:
            with torch.no_grad():
                if self.model.ctx.pp == 1:
                    chunk = self.model.chunks[0]
                    losses = [self._loss_fn(chunk(x), y) for x, y in zip(inputs, labels)]
                else:
                    self._run_pipeline(inputs, labels, losses, forward_only=True)
        finally:
            self._evaluating = False
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([loss.float() for loss in losses]).sum()

    def _schedule(self, num_microbatches: int):
        model = self.model
        if self._stages is None:
            self._stages = [PipelineStage(chunk, cid, model.num_chunks, self.device, group=model.ctx.pp_group)
                            for chunk, cid in zip(model.chunks, model.chunk_ids)]
        if num_microbatches not in self._schedules:
            cls = SCHEDULES[model.parallel_cfg.pp_schedule]
            stages = self._stages if cls is ScheduleInterleaved1F1B else self._stages[0]
            self._schedules[num_microbatches] = cls(stages, num_microbatches, loss_fn=self._loss_fn,
                                                    scale_grads=False)
        return self._schedules[num_microbatches]

    def _run_pipeline(self, inputs: torch.Tensor, labels: torch.Tensor, losses: list,
                      forward_only: bool = False) -> None:
        schedule = self._schedule(inputs.shape[0])
        # contiguous: the batch's slices ([..., :-1]) have the window's stride, which torch 2.11's stages check
        # against the contiguous tensors they were first set up with ("stride mismatch")
        inputs = inputs.flatten(0, 1).contiguous()
        args = (inputs,) if self.model.has_first_chunk else ()
        target = labels.flatten(0, 1) if self.model.has_last_chunk else None
        kwargs = {}
        if self.model.config.document_mask_eos_id is not None:  # every stage finds the documents in the tokens
            kwargs["tokens"] = inputs
        if "return_outputs" in inspect.signature(schedule.step).parameters:
            kwargs["return_outputs"] = False  # do not keep every micro-batch's logits for a return value
        run = schedule.eval if forward_only else schedule.step
        run(*args, target=target, losses=losses if self.model.has_last_chunk else None, **kwargs)

