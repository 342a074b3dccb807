"""Speed features applied to a built model, each behind a `train.*` switch (typed in config.TrainConfig).

- fused_kernels: switch each decoder layer, attention and MLP to the forwards of `nanotronix.kernels.layers`
  (csrc/ CUDA kernels for add+RMSNorm, RoPE+QKV split and SwiGLU; PyTorch twins where they are not built).
- recompute: `full` re-runs each whole decoder layer in the backward (keeps only its input); `selective` keeps
  the outputs of the matmuls and of attention and re-runs the cheap elementwise ops (norms, RoPE, SwiGLU,
  residual adds), the trade Megatron and torchtitan call selective activation checkpointing.
- compile: `torch.compile` each decoder layer (one compiled graph shared by all layers, as torchtitan does);
  Inductor fuses the elementwise ops around the matmuls. With the fused loss on, its per-chunk softmax and
  gradient passes over the [tokens, vocab] logits are compiled too.
- bf16_weight_cache: the decoder linears multiply with bf16 copies of their weights cast once per step
  (`compute_weights.py`), and their gradients go straight into the fp32 buckets.
- grad_accumulation_fusion (with bf16_weight_cache): those gradients are accumulated into the buckets by the
  wgrad GEMM itself, in fp32 (`grad_accumulation_fusion.py`).

The model code stays plain: nothing here changes parameter names (layers are patched in place, never wrapped),
so checkpoints, the HF mapping and tensor-parallel layers see the same module tree. Apply after the model is
tensor-parallelised and split into pipeline stages, in the order of `apply_speedups`.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanotronix.config import TrainConfig
from nanotronix.model.llama import DecoderLayer
from nanotronix.parallel.compute_weights import cache_compute_weights


def decoder_layers(model: nn.Module) -> list[DecoderLayer]:
    return [m for m in model.modules() if isinstance(m, DecoderLayer)]


def apply_fused_kernels(model: nn.Module) -> nn.Module:
    from nanotronix.kernels.layers import FUSED_CLASSES  # the one place that knows the fused forwards
    for module in model.modules():
        fused = FUSED_CLASSES.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model


# Ops whose outputs selective recompute keeps: the expensive ones (matmuls and attention). Everything else in a
# layer is elementwise and re-run in the backward.
_SAVE_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,
}
# flash-attn's forward kernels (custom ops since flash-attn 2.6), by name: they exist only once flash_attn is imported,
# and without them here selective recompute ran every layer's attention forward a second time in the backward.
_SAVE_OP_NAMES = {"flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward"}


def _save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    saved = op in _SAVE_OPS or (isinstance(op, torch._ops.OpOverload) and op.name() in _SAVE_OP_NAMES)
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def _recomputed_forward(forward, mode: str):
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls_policy) \
        if mode == "selective" else None

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def apply_recompute(model: nn.Module, mode: str) -> nn.Module:
    if mode == "none":
        return model
    if mode not in ("selective", "full"):
        raise ValueError(f"recompute mode {mode!r} is not none|selective|full")
    for layer in decoder_layers(model):
        layer.forward = _recomputed_forward(layer.forward, mode)  # instance attribute: names unchanged
    return model


def apply_compile(model: nn.Module, backend: str = "inductor", mode: str = "default") -> nn.Module:
    """Compile each decoder layer in place (`Module.compile` keeps the module and its parameter names), and the
    chunks of the fused head + loss (`model.loss.linear_cross_entropy`) when it is on. `mode`: one of
    config_checks.COMPILE_MODES ("default": torch.compile's own)."""
    options = {"backend": backend, "mode": None if mode == "default" else mode}
    for layer in decoder_layers(model):
        layer.compile(fullgraph=False, **options)
    for chunk in getattr(model, "chunks", None) or []:
        chunk.loss_compile = options
    return model


def apply_fused_loss(model: nn.Module, chunk_size: int) -> bool:
    """Let the last pipeline chunk hand its final hidden states to the loss, which applies the head in chunks of
    `chunk_size` tokens (`parallel.cross_entropy.head_and_loss`; under TP over each rank's vocabulary slice).
    Returns whether it was applied."""
    chunks = getattr(model, "chunks", None) or []
    if chunk_size <= 0:
        return False
    applied = False
    for chunk in chunks:
        if chunk.lm_head is not None:
            chunk.fused_loss_chunk = chunk_size
            applied = True
    return applied


def apply_speedups(model: nn.Module, train: TrainConfig) -> nn.Module:
    """Apply the switched-on features in the one order that composes: fused forwards, then recompute around
    them, then compile around both (compile traces the checkpointed forward); the fused loss is independent."""
    apply_fused_loss(model, train.loss_chunk_size)
    if train.bf16_weight_cache:
        cache_compute_weights(model, torch.bfloat16, train.grad_accumulation_fusion)
    if train.fused_kernels:
        apply_fused_kernels(model)
    apply_recompute(model, train.recompute)
    if train.compile:
        apply_compile(model, backend=train.compile_backend, mode=train.compile_mode)
    return model
