"""bf16 copies of the decoder's matmul weights, cast once per optimizer step instead of once per micro-batch.

The weights are fp32 (their own master copy) and a bf16 run multiplies under autocast, so every micro-batch casts
each weight to bf16 in the forward, casts its bf16 gradient back to fp32 in the backward and then adds that into
the gradient bucket: per parameter and micro-batch ~24 bytes of memory traffic that do no arithmetic (cast 4+2,
cast back 2+4, accumulate 4+4+4), ~40 GB per micro-batch for SmolLM2-1.7B. With `train.bf16_weight_cache`:
  - every gradient bucket holding a decoder linear weight gets a bf16 twin of its parameter buffer, cast from the
    fp32 weights in one kernel per bucket when a training step starts (`GradBuffers.start` calls `arm`);
  - during the step each decoder linear (`ColumnParallelLinear` / `RowParallelLinear`, attribute
    `compute_weight`) multiplies with its bf16 view, a leaf tensor that requires grad, so autocast has nothing to
    cast and autograd hands the leaf its bf16 gradient without any conversion;
  - the leaf's post-accumulate-grad hook adds that gradient straight into the fp32 bucket (`param.main_grad`,
    2+4 read, 4 written), drops it, and tells the buckets the parameter's gradient arrived.
Numerically this is the autocast path: the same bf16 values enter the same matmuls and the same bf16 gradients
are summed in fp32 (tests/test_compute_weights.py checks the steps are bit-identical).

Under ZeRO-1 with overlap_param_gather a bucket is cast when its weights have arrived (`refresh`, from the
forward pre-hook that waits for them), not at `start()`. Under ZeRO-1 the decoder linears fill buckets of their own
(parallelize), and those are gathered straight into their twins in bf16 (`GradBuffers.gather_weights`): half the
all-gather traffic, the same bits as casting after an fp32 gather, and no cast at all in the step; the fp32
weights are then gathered only when something outside a step reads them (`GradBuffers.weights_ready`).
The copies are used only between `GradBuffers.start()` and `finish()`, the micro-batches of one training step,
during which nothing changes the weights. Outside a step (evaluation, export, a checkpoint load, anything) the
layers read the fp32 weights under autocast as before, so a stale copy can never be used.

With train.grad_accumulation_fusion the leaves' gradients are not made at all: each linear's backward adds its
weight gradient into `main_grad` inside the wgrad GEMM (`grad_accumulation_fusion.py`), and this class, listening
on each `main_grad`, reports the arrival to the buckets.

Only the decoder layers' linears take part: the tied embedding is also read by the (fp32) lookup, and the norms
are a few thousand parameters. Hand-written because torch offers this only inside FSDP2's mixed-precision
parameters, which this DP/ZeRO-1 design does not use.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nanotronix.model.llama import DecoderLayer
from nanotronix.parallel import grad_accumulation_fusion
from nanotronix.parallel.data_parallel import GradBuffers, weak_tensor_hook
from nanotronix.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class ComputeWeights:
    def __init__(self, grads: GradBuffers, linears: list[nn.Module], dtype: torch.dtype,
                 fuse_grad_accumulation: bool = False):
        self.grads = grads
        self.linears = linears
        self.fuse_grad_accumulation = fuse_grad_accumulation
        self.leaves: list[torch.Tensor] = []
        self.twins: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # bucket index -> (fp32 data, bf16 twin)
        self.gradients_received = 0  # this step, through the copies (tests check they were really used)
        self.stale: set[int] = set()  # twins not yet cast this step (their weights were still being gathered)
        self.accumulators: dict[int, object] = {}  # fused: id(param) -> its copy's AccumulateGrad node
        cached = {id(m.weight) for m in linears}
        # buckets that hold nothing but these weights: ZeRO-1 gathers them straight into their twins (`twin_of`)
        self.whole_buckets = {b.index for b in grads.buckets if all(id(q) in cached for q in b.params)}
        for module in linears:
            p = module.weight
            bucket = grads.bucket_of(p)
            if bucket.index not in self.twins:
                self.twins[bucket.index] = (bucket.data, torch.empty(bucket.numel, dtype=dtype,
                                                                     device=bucket.data.device))
            offset = next(off for q, off in zip(bucket.params, bucket.offsets) if q is p)
            twin = self.twins[bucket.index][1]
            # detach(): a leaf of its own that shares the twin's memory, so refreshing the twin refreshes it.
            leaf = twin[offset:offset + p.numel()].view_as(p).detach().requires_grad_(True)
            if fuse_grad_accumulation:
                # No gradient ever reaches the copy (the wgrad GEMM accumulates into the bucket); its gradient
                # accumulator node only tells whether a backward pass wants weight gradients at all.
                self.accumulators[id(p)] = leaf.view_as(leaf).grad_fn.next_functions[0][0]
            else:
                leaf.register_post_accumulate_grad_hook(weak_tensor_hook(self._on_grad, p))
            self.leaves.append(leaf)

    def twin_of(self, bucket) -> Optional[torch.Tensor]:
        """The bf16 twin ZeRO-1 may gather `bucket`'s updated weights into (it holds only these weights), else None."""
        return self.twins[bucket.index][1] if bucket.index in self.whole_buckets else None

    def arm(self) -> None:
        """Cast the current weights into the twins and let the linears use them (start of a training step). A
        bucket whose ZeRO-1 weight gather is still running (parallel.overlap_param_gather) is cast later, by
        `refresh` once its gather is waited, before the first layer that reads it; one gathered into its twin
        needs no cast at all."""
        held = {i for i in self.twins if self.grads.twin_holds_weights(self.grads.buckets[i])}
        self.stale = {i for i in self.twins if i not in held and self.grads.buckets[i].gather is not None}
        with torch.no_grad():
            for i, (data, twin) in self.twins.items():
                if i not in self.stale and i not in held:
                    twin.copy_(data)
        self.gradients_received = 0
        for module, leaf in zip(self.linears, self.leaves):
            module.compute_weight = leaf
            if self.fuse_grad_accumulation:
                p = module.weight
                module.weight_grad_target = p.main_grad
                grad_accumulation_fusion.listen(p.main_grad, self, p)

    def refresh(self, bucket_index: int) -> None:
        """Cast bucket `bucket_index` into its twin if `arm` left it stale (its weights are now gathered)."""
        if bucket_index in self.stale:
            self.stale.discard(bucket_index)
            data, twin = self.twins[bucket_index]
            with torch.no_grad():
                twin.copy_(data)

    def disarm(self) -> None:
        """Back to the fp32 weights (end of the step's backward)."""
        for module in self.linears:
            module.compute_weight = None
            if module.weight_grad_target is not None:
                grad_accumulation_fusion.stop_listening(module.weight_grad_target)
                module.weight_grad_target = None

    def _on_grad(self, param: nn.Parameter, leaf: torch.Tensor) -> None:
        param.main_grad.add_(leaf.grad)
        leaf.grad = None
        self.gradients_received += 1
        self.grads.gradient_arrived(param)

    def wants_weight_gradient(self, param: nn.Parameter) -> bool:
        """Whether the running backward pass computes weight gradients: not one that asks autograd.grad for input
        gradients only (torch.distributed.pipelining does so on its first step, to learn the stage inputs'
        gradient shapes), which must not accumulate anything into the buckets."""
        return torch._C._will_engine_execute_node(self.accumulators[id(param)])

    def weight_gradient_arrived(self, param: nn.Parameter) -> None:
        """The wgrad GEMM has added one micro-batch's gradient of `param` into its main_grad."""
        self.gradients_received += 1
        self.grads.gradient_arrived(param)


def decoder_linears(model: nn.Module) -> list[nn.Module]:
    """The linears whose weights get twins: every ColumnParallelLinear / RowParallelLinear of a decoder layer."""
    return [m for layer in model.modules() if isinstance(layer, DecoderLayer)
            for m in layer.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def cache_compute_weights(model: nn.Module, dtype: torch.dtype,
                          fuse_grad_accumulation: bool = False) -> ComputeWeights:
    """Give every decoder-layer linear of the parallelised `model` a `dtype` twin (see the module docstring);
    with `fuse_grad_accumulation` their weight gradients are accumulated by the wgrad GEMM into the buckets."""
    linears = decoder_linears(model)
    if fuse_grad_accumulation:
        grad_accumulation_fusion.check_available(next(model.parameters()).device)
    weights = ComputeWeights(model.grads, linears, dtype, fuse_grad_accumulation)
    model.grads.compute_weights = weights
    return weights
