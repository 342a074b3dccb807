"""Gradient accumulation straight into the data-parallel buckets (nanotronix/parallel/data_parallel.py), one
process: `param.grad` is the bucket view, so micro-batches accumulate in place with no copy; when something
replaces `param.grad` mid-step (here `zero_grad()` before every micro-batch) the fallback adds the stray gradient
into the bucket, and the step is the same as a plain PyTorch run of the same micro-batches."""
import pytest
import torch
import torch.nn.functional as F

from nanotronix.config import config_from_dict
from nanotronix.model import build_model
from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
from nanotronix.train.optimizer import param_groups
from nanotronix.train.step import train_step

MODEL = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 32, "init_std": 0.05,
         "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def _cfg():
    return config_from_dict({"model": MODEL, "parallel": {"grad_bucket_size": 2000},
                             "train": {"seq_len": 12, "global_batch_size": 6, "micro_batch_size": 2}})


def _batch():
    return torch.randint(0, MODEL["vocab_size"], (3, 2, 13), generator=torch.Generator().manual_seed(5))


def _plain_grads(cfg, batch):
    """Plain PyTorch: the same initial weights, loss mean over micro-batches, .grad accumulation."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for micro in batch:
        logits = model(micro[:, :-1])
        (F.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten()) / len(batch)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("detach_between_microbatches", [False, True])
def test_gradients_accumulate_in_the_bucket(detach_between_microbatches):
    cfg, batch = _cfg(), _batch()
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
    if detach_between_microbatches:
        model.chunks[0].register_forward_pre_hook(lambda module, args: model.zero_grad(set_to_none=True))
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.0), lr=0.0, betas=(0.9, 0.95),
                               eps=1e-8)
    train_step(model, opt, batch, lr=0.0, clip_grad=0.0)
    grads = model.grads
    assert len(grads.buckets) >= 2
    params = dict(model.named_parameters())
    for p in params.values():
        assert p.grad is not None and p.grad.data_ptr() == p.main_grad.data_ptr()
    if detach_between_microbatches:
        assert grads.copied_grads == len(params) * len(batch)
    else:
        assert grads.copied_grads == 0
    for name, want in _plain_grads(cfg, batch).items():
        torch.testing.assert_close(params[name].main_grad, want, rtol=1e-5, atol=1e-6, msg=name)
