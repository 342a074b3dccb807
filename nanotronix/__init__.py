"""nanotronix: Megatron-style 3D-parallel pre-training of SmolLM2-family Llama models."""

__version__ = "0.1.0"
