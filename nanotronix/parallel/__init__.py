"""Tensor, sequence, pipeline and data parallelism for the plain Llama of `nanotronix.model`.

    ctx = ParallelContext.build(cfg)                       # process groups (after dist.init_process_group)
    model = parallelize(build_model(cfg.model), ctx, cfg)  # this rank's TP/SP/PP part, DP gradient hooks
    optimizer = DistributedOptimizer(model, groups, lr, betas, eps)   # AdamW, ZeRO-1 when zero_stage: 1
    nanotronix.train.step.train_step(model, optimizer, batch, lr, clip_grad)
"""
from nanotronix.parallel.context import ParallelContext
from nanotronix.parallel.model import ModelChunk, ParallelModel, parallelize
from nanotronix.parallel.optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer", "ModelChunk", "ParallelContext", "ParallelModel", "parallelize"]
