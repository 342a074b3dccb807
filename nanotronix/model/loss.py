"""Next-token cross entropy, computed in fp32 and averaged over the tokens of the batch whose label is not -100.

`cross_entropy` takes full logits (the plain path). `linear_cross_entropy` fuses the output head into the loss
and works through the tokens in chunks, so the [tokens, vocab] logits never exist in full, in any dtype: each
chunk's logits are made, turned into its loss and its gradients (w.r.t. the hidden states and the head weight),
and freed. The gradients are computed during the forward pass (the loss is the last op of the graph, so its
backward is only a scale by the incoming gradient); the head matmuls are the same three as the plain path, so
the saving is memory (SmolLM2-1.7B, 8192 tokens: ~4.8 GB of bf16/fp32 logits and their gradient) and the
elementwise passes over them. Hand-written because torch has no fused linear + CE op; the idea is the one of
Liger-Kernel's FusedLinearCrossEntropy (written here from the math, not from its code).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from nanotronix.kernels.functions import wgrad_accumulate_fp32


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction=reduction)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the plain head's matmul runs in: autocast's when it is on, else the weight's."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def _chunk_loss_and_grads(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, row_scale: torch.Tensor,
                          want_grads: bool):
    """One chunk of tokens: returns its part of the mean loss, sum(row_scale * loss per token), and, with
    `want_grads`, that sum's gradients w.r.t. the logits and h, both in h's dtype (the caller turns the first into
    the head weight's gradient). row_scale (fp32, one per token) is 1 / (tokens counted) for a counted token and 0
    for an ignored one (whose label the caller has made 0). The logits exist only here, in fp32; compiled
    (Inductor), not even that: one pass over the matmul's output finds the log-sum-exp, another writes the
    low-precision gradient."""
    logits = (h @ w.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, y[:, None]).squeeze(1)
    loss_sum = ((lse - target_logit) * row_scale).sum()
    if not want_grads:
        return loss_sum, None, None
    # d(loss)/d(logits) = softmax - onehot. The softmax part is made in place in the logits buffer and rounded to
    # h's dtype in the same pass; the label entries, where the 1 is subtracted (in fp32: subtracting after
    # rounding would cancel badly), are computed apart and written over it (a scatter of one entry per token).
    grad_logits = logits.sub_(lse[:, None]).exp_().mul_(row_scale[:, None]).to(h.dtype)
    at_label = ((target_logit - lse).exp() - 1.0) * row_scale
    grad_logits.scatter_(1, y[:, None], at_label[:, None].to(h.dtype))
    return loss_sum, grad_logits, grad_logits @ w


class InputCollectives(NamedTuple):
    """How the hidden states reach a head split over ranks (tensor parallelism, `parallel.cross_entropy`): `gather`
    takes this rank's hidden states, cast to the compute dtype, to the [..., D] that every rank multiplies (the
    sequence's all-gather; None: every rank has them whole already); `reduce_grad` takes that tensor's gradient, in
    the hidden states' dtype, to this rank's (the sum over the ranks: all-reduce or reduce-scatter). So the
    gather moves bf16 under autocast (half the bytes of the fp32 norm output) and the gradient is still summed in
    fp32, as the plain head's cast + collective + matmul does it."""
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]]
    reduce_grad: Callable[[torch.Tensor], torch.Tensor]


_compiled: dict[tuple, Callable] = {}


def maybe_compiled(fn: Callable, compile_options: Optional[dict]) -> Callable:
    """`fn` through torch.compile with `compile_options` (made once per function and options), or `fn` itself."""
    if not compile_options:
        return fn
    key = (fn, *sorted(compile_options.items()))
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, **compile_options)
    return _compiled[key]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                chunk_size: int, compute_dtype: torch.dtype, chunk_fn: Callable, grad_enabled: bool,
                input_collectives: Optional[InputCollectives]) -> torch.Tensor:
        # grad_enabled: the caller's grad mode (always off in here; needs_input_grad stays True under no_grad, as in
        # validation, which then would compute and drop the gradients)
        whole = hidden
        if input_collectives is not None and input_collectives.gather is not None:
            # cast to compute_dtype (what each chunk multiplies in) before gathering: the same values in fewer bytes
            whole = input_collectives.gather(hidden.to(compute_dtype))
        ctx.whole_shape = whole.shape
        whole = whole.flatten(0, -2)
        n = whole.shape[0]
        w = weight.to(compute_dtype)
        # d/dh is made in compute_dtype (grad_logits @ w): kept so when that is the narrower dtype (bf16 for an fp32
        # hidden: half the bytes until backward), with the same values
        grad_dtype = compute_dtype if compute_dtype.itemsize < hidden.dtype.itemsize else hidden.dtype
        grad_hidden = torch.empty(whole.shape, dtype=grad_dtype, device=whole.device) \
            if grad_enabled and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if grad_enabled and ctx.needs_input_grad[1] else None
        want_grads = grad_hidden is not None or grad_weight is not None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The mean over the counted tokens, as F.cross_entropy takes it: each token's loss and gradients scaled by
        # 1 / (tokens counted), or 0 where the label is ignore_index (then made a valid id, 0). Tensors, not a
        # Python count: no device sync, and one compiled chunk for every batch size.
        counted = labels != ignore_index
        count = counted.sum().to(torch.float32)
        row_scale = torch.where(counted, 1.0 / count, 0.0)
        labels = labels.masked_fill(~counted, 0)
        for start in range(0, n, chunk_size):
            h = whole[start:start + chunk_size].to(compute_dtype)
            chunk_loss, grad_logits, grad_h = chunk_fn(h, w, labels[start:start + chunk_size],
                                                       row_scale[start:start + chunk_size], want_grads)
            loss += chunk_loss
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_h
            if grad_weight is not None:
                # Outside the compiled function: torch.compile cannot yet trace the fp32-accumulating GEMM
                # (addmm with out_dtype and out=), and it would run as the same cuBLAS call anyway.
                wgrad_accumulate_fp32(grad_weight, grad_logits, h)
            # freed now, not when the next chunk's replace them: else two chunks' logits exist at once
            del h, grad_logits, grad_h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.input_collectives = input_collectives
        # no token counted: F.cross_entropy's mean of nothing, nan (its gradients are 0, as these are)
        return torch.where(count > 0, loss, torch.nan)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = gw = None
        if grad_hidden is not None:
            # scaled in hidden's dtype (fp32: exact products of the bf16 values), then reduced over the ranks in it.
            # Both kept gradients are scaled in place (a bf16 dX in its fp32 copy): this is their last use, and a
            # scaled copy would be a second [tokens, D] or fp32 [V, D] tensor beside them at backward's start (a
            # second backward through the graph is refused by autograd: its saved tensors changed)
            gh = grad_hidden.to(ctx.hidden_dtype).mul_(grad_loss.to(ctx.hidden_dtype)).view(ctx.whole_shape)
            if ctx.input_collectives is not None:
                gh = ctx.input_collectives.reduce_grad(gh)
        if grad_weight is not None:
            gw = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                         compute_dtype: Optional[torch.dtype] = None, compile_options: Optional[dict] = None,
                         chunk_fn: Optional[Callable] = None, ignore_index: int = -100,
                         input_collectives: Optional[InputCollectives] = None) -> torch.Tensor:
    """mean CE of `hidden @ weight.T` against `labels`, in chunks of `chunk_size` tokens.

    hidden [..., D] (the final norm's output), weight [V, D] (the head, tied or not), labels [...] (int64; a label
    equal to `ignore_index` adds no loss and no gradient, and the mean is over the other tokens).
    Same value and gradients as `cross_entropy(F.linear(hidden, weight), labels)` up to rounding; the matmuls run
    in `compute_dtype` (default: autocast's dtype when autocast is on, like the plain head), logits in fp32.
    `compile_options` (torch.compile's keyword arguments, e.g. {"backend": "inductor"}): each chunk's head matmul and
    softmax run through torch.compile, which fuses the elementwise passes over the [chunk, vocab] logits (the
    trainer does so under `train.compile`, with train.compile_mode).
    `chunk_fn(h, w, labels, row_scale, want_grads) -> (scaled loss sum, grad of the logits, grad of h)` replaces the
    plain chunk (`_chunk_loss_and_grads`): the vocab-parallel loss (parallel/cross_entropy.py) passes one that
    combines its vocabulary slice's log-sum-exp with the other ranks', and `input_collectives` the collectives that
    bring `hidden` (this rank's) to the head and its gradient back (`labels` are then the gathered tokens').
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = compute_dtype or _compute_dtype(weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels.flatten(), ignore_index, chunk_size, dtype,
                                         chunk_fn or maybe_compiled(_chunk_loss_and_grads, compile_options),
                                         torch.is_grad_enabled(), input_collectives)
