"""Cross entropy over logits split along the vocabulary across tensor-parallel ranks, never gathering them.

Rank r holds logits for vocabulary ids [r*V/tp, (r+1)*V/tp) (the output of the column-parallel head). Per token:
    m   = max over all ranks of the local maxima                       (all-reduce MAX, 1 float per token)
    Z   = sum over ranks of sum(exp(logits - m))                       (all-reduce SUM, packed with the next)
    t   = the target's logit - m, found on the rank that holds the target, 0 elsewhere
    loss = log Z - t,     d loss / d logits = softmax - one_hot(target)   (local slice of each)
so the communication is 3 floats per token instead of V. Hand-written (Megatron-LM's `vocab_parallel_cross_entropy`
does the same) because torch's `loss_parallel` needs DTensor logits. Computed in fp32; `ignore_index` targets give
a zero loss and no gradient, as in `torch.nn.functional.cross_entropy`.

`head_and_loss` (train.loss_chunk_size) fuses the head into the loss and runs it over chunks of tokens
(`model.loss.linear_cross_entropy`); under TP each chunk is multiplied with the rank's vocabulary slice and
combined by the same three reductions, so no rank holds even its [tokens, V/tp] logits at once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from nanotronix.model.loss import linear_cross_entropy, maybe_compiled
from nanotronix.parallel import mappings
from nanotronix.parallel.mappings import Group


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: Group, ignore_index: int):
        local_vocab = logits.shape[-1]
        vocab_start = mappings.group_rank(group) * local_vocab
        distributed = mappings.group_size(group) > 1

        row_max = logits.max(dim=-1).values
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - row_max.unsqueeze(-1)).exp_()

        local_target = labels - vocab_start
        here = (local_target >= 0) & (local_target < local_vocab)
        local_target = local_target.masked_fill(~here, 0)
        target_logit = (logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) - row_max).masked_fill(~here, 0.0)

        sums = torch.stack([exp.sum(dim=-1), target_logit])
        if distributed:
            dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums[0], sums[1]

        valid = labels != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, here & valid, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, target_here, valid = ctx.saved_tensors
        grad = softmax.clone()
        rows = target_here.nonzero(as_tuple=True)[0]
        grad[rows, local_target[rows]] -= 1.0
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group: Group,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of local vocab-slice logits [..., V/tp] against global labels [...] (fp32).

    reduction "none" gives the loss per token (0 at ignored ones); "mean" averages over the non-ignored tokens (nan,
    with zero gradients, where there are none), "sum" adds them: the same results as `F.cross_entropy` on the
    gathered logits.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    per_token = _VocabParallelCrossEntropy.apply(flat_logits, flat_labels, group, ignore_index)
    if reduction == "none":
        return per_token.view(labels.shape)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        # No token counted: F.cross_entropy's nan with zero gradients, not 0 / 0's nan gradients (0 * inf).
        count = (flat_labels != ignore_index).sum()
        return torch.where(count > 0, per_token.sum() / count.clamp(min=1), torch.nan)
    raise ValueError(f"reduction {reduction!r} is not none|sum|mean")


# ---- the head fused into the loss, over this rank's vocabulary slice (train.loss_chunk_size under TP) -------------

def _slice_logits(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (h @ w.t()).float()
    return logits, logits.amax(dim=-1)


def _slice_sums(logits: torch.Tensor, row_max: torch.Tensor, local: torch.Tensor, here: torch.Tensor) -> torch.Tensor:
    """[2, tokens]: this slice's sum of exp(logit - max), and the target's logit - max where it holds the target."""
    sum_exp = (logits - row_max[:, None]).exp().sum(dim=-1)
    target = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1) - row_max
    return torch.stack([sum_exp, torch.where(here, target, torch.zeros_like(target))])


def _slice_grads(logits: torch.Tensor, lse: torch.Tensor, at_label: torch.Tensor, local: torch.Tensor,
                 here: torch.Tensor, row_scale: torch.Tensor, w: torch.Tensor, dtype: torch.dtype):
    """row_scale * (softmax - onehot) of this slice's logits in `dtype` (made in place in the logits buffer, the
    label entries written over it), and its product with the slice's weight: this slice's part of d/dh."""
    grad_logits = logits.sub_(lse[:, None]).exp_().mul_(row_scale[:, None]).to(dtype)
    index = local.clamp(0, logits.shape[1] - 1)[:, None]
    label_entry = torch.where(here, at_label.to(dtype), grad_logits.gather(1, index).squeeze(1))
    grad_logits.scatter_(1, index, label_entry[:, None])
    return grad_logits, grad_logits @ w


class _VocabSliceChunk:
    """`linear_cross_entropy`'s chunk for a head split along the vocabulary: the same math, with the row max, the
    sum of exponentials and the target logit combined over the TP group (3 floats per token, as above). Each rank
    gets the whole chunk's loss and the gradients of its own slice; its d/dh is its slice's part, summed over the
    ranks by the head's input collectives in backward."""

    def __init__(self, group: Group, vocab_start: int, compile_options: Optional[dict]):
        self.group, self.vocab_start = group, vocab_start
        self.logits_fn = maybe_compiled(_slice_logits, compile_options)
        self.sums_fn = maybe_compiled(_slice_sums, compile_options)
        self.grads_fn = maybe_compiled(_slice_grads, compile_options)

    def __call__(self, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, row_scale: torch.Tensor, want_grads: bool):
        logits, row_max = self.logits_fn(h, w)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.group)
        local = y - self.vocab_start
        here = (local >= 0) & (local < w.shape[0])
        sums = self.sums_fn(logits, row_max, local, here)
        dist.all_reduce(sums, group=self.group)
        log_sum_exp = sums[0].log()  # log of the sum over the whole vocabulary of exp(logit - max)
        loss_sum = ((log_sum_exp - sums[1]) * row_scale).sum()
        if not want_grads:
            return loss_sum, None, None
        at_label = ((sums[1] - log_sum_exp).exp() - 1.0) * row_scale  # softmax - 1 at the target, in fp32
        grad_logits, grad_h = self.grads_fn(logits, row_max + log_sum_exp, at_label, local, here, row_scale, w,
                                            h.dtype)
        return loss_sum, grad_logits, grad_h


def head_and_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int,
                  compute_dtype: Optional[torch.dtype], compile_options: Optional[dict], group: Group) -> torch.Tensor:
    """Mean next-token loss of the head applied to `hidden` (the final norm's output) in chunks of `chunk_size`
    tokens, never making the [tokens, vocab] logits: `model.loss.linear_cross_entropy`, and under tensor
    parallelism its vocab-parallel form (the head's input collectives, each rank's vocabulary slice). Labels of -100
    are not counted, as in `vocab_parallel_cross_entropy` and `F.cross_entropy`."""
    if group is None:
        return linear_cross_entropy(hidden, head.weight, labels, chunk_size, compute_dtype, compile_options)
    chunk = _VocabSliceChunk(group, mappings.group_rank(group) * head.weight.shape[0], compile_options)
    return linear_cross_entropy(hidden, head.weight, labels, chunk_size, compute_dtype, chunk_fn=chunk,
                                input_collectives=head.input_collectives())
