"""Weight gradients accumulated into the fp32 buckets by the wgrad GEMM itself (`train.grad_accumulation_fusion`).

Under `train.bf16_weight_cache` a decoder linear's backward makes its weight gradient as a bf16 tensor (the wgrad
GEMM writes 2 bytes per element) and a separate kernel then adds it into the fp32 bucket `main_grad` (reads 2 + 4
bytes, writes 4). With this switch the linear's backward instead runs one GEMM that reads `main_grad`, adds
grad_out^T @ input computed with fp32 accumulation and writes it back (cuBLAS with an fp32 C and beta = 1, through
torch's `addmm(..., out_dtype=torch.float32, out=main_grad)`; `kernels.functions.wgrad_accumulate_fp32`): no bf16
gradient tensor and no separate pass (10 bytes per parameter, ~16 GB per SmolLM2-1.7B micro-batch); the GEMM,
compute-bound anyway, reads and writes 8 bytes per parameter in its epilogue instead of writing 2. The gradient is
also no longer rounded to bf16 before it is summed. Megatron-LM calls this gradient_accumulation_fusion (there with
apex's kernel).

The accumulation is a custom op, `nanotronix::accumulate_weight_grad`, that declares it mutates `main_grad`:
torch.compile keeps it as one opaque call inside the compiled layer's backward, on the bucket's own memory (no
copy, one graph for all layers; tests/test_compute_weights.py). After accumulating, the op reports the gradient to
whoever registered that buffer (`ComputeWeights`, which tells the gradient buckets, so a bucket's data-parallel
reduction still starts during backward as soon as its last gradient is in). The op finds the listener by the
buffer's address, not by an argument, because a per-layer constant would make torch.compile specialise (and
recompile) each layer. That also makes it safe: torch.compile functionalises the mutation, and Inductor turns it
back into the in-place call on the bucket; a backend that does not (aot_eager) would hand the op a copy of the
whole bucket, whose address no listener has, and the op raises instead of reporting a gradient that is not in the
bucket yet.

A weight gradient made inside the backward of a linear is made whenever that backward runs, also by a pass that
asked autograd.grad for input gradients only (torch.distributed.pipelining runs one on its first step to learn
the shapes of the stage inputs' gradients). So before accumulating, the op asks the listener whether the running
backward will execute the gradient accumulator of the weight's bf16 copy (`torch._C._will_engine_execute_node`,
what torch's own multi-grad hooks use): a full backward does, an input-only one does not, and then the op does
nothing.

The GEMM is torch's; what is hand-written is the plumbing torch has no switch for: an autograd Function whose
backward hands the weight gradient to that GEMM instead of returning it, and the op that keeps torch.compile from
copying the bucket and reports arrivals. On CPU (tests) the op runs the PyTorch twin
(`kernels.reference.wgrad_accumulate_fp32`, the same fp32 sums).
"""
from __future__ import annotations

import weakref
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanotronix import accel
from nanotronix.errors import UserError
from nanotronix.kernels import functions

# main_grad.data_ptr() -> (owner, parameter), both weak: the owner (`ComputeWeights`) is asked whether the running
# backward wants weight gradients and told when one arrived. Weak, so that a step that dies half-way (an
# out-of-memory error, before `disarm`) cannot keep its model and buckets alive through this module-level table.
_listeners: dict[int, tuple[weakref.ref, weakref.ref]] = {}


class Listener(Protocol):
    def wants_weight_gradient(self, param: nn.Parameter) -> bool: ...

    def weight_gradient_arrived(self, param: nn.Parameter) -> None: ...


def listen(main_grad: torch.Tensor, owner: Listener, param: nn.Parameter) -> None:
    _listeners[main_grad.data_ptr()] = (weakref.ref(owner), weakref.ref(param))


def stop_listening(main_grad: torch.Tensor) -> None:
    _listeners.pop(main_grad.data_ptr(), None)


def _listener(main_grad: torch.Tensor) -> Optional[tuple[Listener, nn.Parameter]]:
    entry = _listeners.get(main_grad.data_ptr())
    if entry is None:
        return None
    owner, param = entry[0](), entry[1]()
    if owner is None or param is None:  # its model is gone: a stale entry
        del _listeners[main_grad.data_ptr()]
        return None
    return owner, param


def check_available(device: torch.device) -> None:
    """Raise the one-line reason when the fused accumulation cannot run on `device`."""
    if torch.device(device).type == "cuda" and not accel.fp32_accumulating_gemm():
        raise UserError(f"train.grad_accumulation_fusion: torch {torch.__version__} cannot accumulate a bf16 GEMM "
                        "into an fp32 buffer (torch.addmm with out_dtype=float32 and an fp32 input needs torch >= "
                        "2.10): upgrade torch, or set train.grad_accumulation_fusion=false")


@torch.library.custom_op("nanotronix::accumulate_weight_grad", mutates_args=("main_grad",))
def accumulate_weight_grad(main_grad: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor) -> None:
    """main_grad [out, in] (fp32) += grad_out[tokens, out]^T @ inp[tokens, in], then tell its listener; nothing
    when the listener says the running backward wants no weight gradients."""
    listener = _listener(main_grad)
    if listener is None and _listeners:  # armed, yet not one of the buffers: a copy (see the module docstring)
        raise RuntimeError("nanotronix::accumulate_weight_grad ran on a copy of a gradient buffer: the torch.compile "
                           "backend did not re-inplace the mutation (inductor does, aot_eager does not)")
    if listener is not None and not listener[0].wants_weight_gradient(listener[1]):
        return
    functions.wgrad_accumulate_fp32(main_grad, grad_out, inp)
    if listener is not None:
        listener[0].weight_gradient_arrived(listener[1])


@accumulate_weight_grad.register_fake
def _(main_grad: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor) -> None:
    return None


class _LinearAccumulatingWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, main_grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        # An attribute, not a saved tensor: every accumulation into the bucket bumps the version counter that all
        # its views share, which save_for_backward would report as a modified input.
        ctx.main_grad = main_grad
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        accumulate_weight_grad(ctx.main_grad, grad_out.flatten(0, -2), x.flatten(0, -2))
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def linear_accumulating_weight_grad(x: torch.Tensor, weight: torch.Tensor, main_grad: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) whose backward adds the weight's gradient into `main_grad` (fp32, the shape of weight)
    instead of returning it. x is cast to the weight's dtype first, as autocast would."""
    return _LinearAccumulatingWeightGrad.apply(x.to(weight.dtype), weight, main_grad)
