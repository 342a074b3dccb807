"""Fused ops for the Llama block (csrc/ CUDA kernels with pure-PyTorch twins) and the fused layer classes."""
from nanotronix.kernels.functions import add_rms_norm, rms_norm, rope_split_qkv, swiglu

__all__ = ["add_rms_norm", "rms_norm", "rope_split_qkv", "swiglu"]
