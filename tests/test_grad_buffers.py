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


class LateGather:
    """Stands in for a ZeRO-1 weight all-gather still in flight: the bucket's new weights land only on wait()."""

    def __init__(self, bucket):
        self.bucket, self.values = bucket, bucket.data + 1.0

    def wait(self):
        self.bucket.data.copy_(self.values)


def _with_late_gathers():
    """A model whose forward parts wait for their buckets (parallel.overlap_param_gather), every bucket's gather
    pending; returns the model, the weights the gathers will deliver, and the optimizer."""
    from nanotronix.parallel.model import weight_readers

    cfg = _cfg()
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.0), lr=0.0, betas=(0.9, 0.95),
                               eps=1e-8)
    model.grads.install_weight_hooks(weight_readers(model.chunks))
    for b in model.grads.buckets:
        b.gather = LateGather(b)
    arrived = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    return cfg, model, opt, arrived


def test_forward_parts_wait_for_their_own_weights():
    """Each part (embedding, layers, norm + head) waits only for its buckets, in forward order, and the forward
    computes with the gathered weights; a bucket's gather is waited before any part that reads it."""
    cfg, model, _, arrived = _with_late_gathers()
    x = _batch()[0, :, :-1]
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    plain.load_state_dict({**arrived, "lm_head.weight": arrived["embed_tokens.weight"]})  # tied
    # the chunk, as train_step runs it (model(x) would wait for every weight first, for readers outside a step)
    torch.testing.assert_close(model.chunks[0](x), plain(x), rtol=1e-5, atol=1e-5)
    grads = model.grads
    assert grads.gathers_pending() == 0
    waited = [b.gather_waited_after for b in grads.buckets]  # buckets hold the weights in backward order
    assert waited[-1] == 1 and waited == sorted(waited, reverse=True) and len(set(waited)) > 1, waited



def test_checkpoints_wait_for_pending_weight_gathers(tmp_path):
    """A snapshot taken while ZeRO-1's gathers run holds the gathered weights; a checkpoint load waits for gathers
    in flight first, so none lands afterwards over the loaded weights."""
    from nanotronix.checkpoint.staging import HostStaging
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import load_training_state, take_snapshot, write_snapshot

    cfg, model, opt, arrived = _with_late_gathers()
    snap = take_snapshot(1, model, opt, model.ctx, cfg.to_dict(), {"consumed_samples": 6}, staging=HostStaging(),
                         coll=Collective(None))
    for name, want in arrived.items():
        assert torch.equal(snap.pieces[f"model.{name}"].tensor, want), name
    assert model.grads.gathers_pending() == 0
    folder = write_snapshot(snap, tmp_path, Collective(None))
    for b in model.grads.buckets:
        b.gather = LateGather(b)  # would add 1 to every weight when it lands
    load_training_state(folder, model, opt, model.ctx, Collective(None), tied=True)
    assert model.grads.gathers_pending() == 0
    for name, p in model.named_parameters():
        assert torch.equal(p, arrived[name]), name


def test_a_forward_that_skipped_its_wait_fails_the_step():
    """finish() refuses a step during which a weight gather stayed pending (a part ran without waiting)."""
    from nanotronix.parallel.model import weight_readers

    _, model, opt, _ = _with_late_gathers()
    for module, _ in weight_readers(model.chunks):
        module._forward_pre_hooks.clear()  # as if a model part had no hook
    with pytest.raises(RuntimeError, match="weight all-gather"):
        train_step(model, opt, _batch(), lr=0.0, clip_grad=0.0)
