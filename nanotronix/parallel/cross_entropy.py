"""Cross entropy over logits split along the vocabulary across tensor-parallel ranks, never gathering them.

Rank r holds logits for vocabulary ids [r*V/tp, (r+1)*V/tp) (the output of the column-parallel head). Per token:
    m   = max over all ranks of the local maxima                       (all-reduce MAX, 1 float per token)
    Z   = sum over ranks of sum(exp(logits - m))                       (all-reduce SUM, packed with the next)
    t   = the target's logit - m, found on the rank that holds the target, 0 elsewhere
    loss = log Z - t,     d loss / d logits = softmax - one_hot(target)   (local slice of each)
so the communication is 3 floats per token instead of V. Hand-written (Megatron-LM's `vocab_parallel_cross_entropy`
does the same) because torch's `loss_parallel` needs DTensor logits. Computed in fp32; `ignore_index` targets give
a zero loss and no gradient, as in `torch.nn.functional.cross_entropy`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

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

    reduction "none" gives the loss per token (0 at ignored ones); "mean" averages over the non-ignored tokens,
    "sum" adds them: the same results as `F.cross_entropy` on the gathered logits.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    per_token = _VocabParallelCrossEntropy.apply(flat_logits, flat_labels, group, ignore_index)
    if reduction == "none":
        return per_token.view(labels.shape)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / (flat_labels != ignore_index).sum()
    raise ValueError(f"reduction {reduction!r} is not none|sum|mean")
