from nanotronix.model.llama import DecoderLayer, Llama, build_model
from nanotronix.model.loss import cross_entropy

__all__ = ["DecoderLayer", "Llama", "build_model", "cross_entropy"]
