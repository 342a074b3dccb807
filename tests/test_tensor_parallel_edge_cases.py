"""The tensor-parallel wiring in cases a mutation review found untested (context groups, attention backend choice).

- `ParallelContext`'s rank coordinates and process groups against a plain decoding of the documented rank order
  (rank = tp + TP * (dp + DP * pp)), for layouts whose dimensions all differ, so that no two strides coincide;
  the groups are recorded by a stand-in `dist.new_group` (no processes: every rank's view is built in turn).
  Before this, only the 8-rank torchrun layout exercised the group construction at all.
- `accel.resolve_attention` refuses the CUDA-only backends on a CPU device even when the package is importable
  (flash-attn installed on a machine that trains on CPU, or cuDNN present), and `auto` never picks flash-attn
  off CUDA.
- the decoder layers' TP wiring: which linears become column/row parallel with which collectives, and that under
  activation recomputation `parallelize` makes the SP column linears keep the gathered input (a memory/traffic
  choice with identical numerics, so no layout comparison can notice it).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from nanotronix import accel
from nanotronix.parallel import context as context_module
from nanotronix.parallel.context import ParallelContext

LAYOUTS = [(2, 3, 4), (3, 2, 4), (2, 1, 4), (4, 3, 2), (1, 2, 3)]  # (tp, dp, pp)


def _coords(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(tp, dp, pp) coordinates of `rank`, decoded digit by digit: tp fastest, then dp, then pp."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def _groups_of(ctx: ParallelContext, monkeypatch) -> ParallelContext:
    monkeypatch.setattr(context_module.dist, "new_group", lambda ranks, timeout=None: tuple(ranks))
    ctx._create_groups(timeout=None)
    return ctx


@pytest.mark.parametrize("tp, dp, pp", LAYOUTS, ids=lambda v: str(v))
def test_rank_coordinates_and_groups_follow_the_documented_rank_order(tp, dp, pp, monkeypatch):
    """Every rank's tp/dp/pp coordinates, its pipeline peers, and the members of its TP, DP, PP and embedding
    groups are those of the plain decoding: a group holds exactly the ranks that agree with this one on the other
    coordinates (in increasing order of the varying one); the embedding group is the first and last stage."""
    world = tp * dp * pp
    coords = {r: _coords(r, tp, dp) for r in range(world)}
    for rank in range(world):
        ctx = _groups_of(ParallelContext(tp=tp, pp=pp, dp=dp, rank=rank, world_size=world), monkeypatch)
        t, d, p = coords[rank]
        assert (ctx.tp_rank, ctx.dp_rank, ctx.pp_rank) == (t, d, p), rank
        assert ctx.is_first_stage == (p == 0) and ctx.is_last_stage == (p == pp - 1)
        for q in range(pp):
            assert coords[ctx.pp_peer(q)] == (t, d, q)
        same = lambda axis: tuple(r for r in range(world)  # noqa: E731
                                  if all(coords[r][i] == coords[rank][i] for i in range(3) if i != axis))
        assert ctx.tp_group == same(0), rank
        assert ctx.dp_group == same(1), rank
        assert ctx.pp_group == same(2), rank
        pipeline = same(2)
        ends = tuple(sorted({pipeline[0], pipeline[-1]}))
        if rank in ends:
            assert ctx.embedding_group == ends, rank


def test_every_group_partitions_the_ranks(monkeypatch):
    """For each kind, the groups the ranks keep cover every rank exactly once (a rank in two TP groups, or one left
    out, would make two ranks disagree on who they reduce with)."""
    tp, dp, pp = 2, 3, 4
    world = tp * dp * pp
    views = [_groups_of(ParallelContext(tp=tp, pp=pp, dp=dp, rank=r, world_size=world), monkeypatch)
             for r in range(world)]
    for kind, size in (("tp_group", tp), ("dp_group", dp), ("pp_group", pp)):
        groups = {getattr(v, kind) for v in views}
        assert all(len(g) == size for g in groups), kind
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(world)), kind
        for rank, view in enumerate(views):
            assert rank in getattr(view, kind), (kind, rank)


@pytest.mark.parametrize("requested", ["flash_attention_2", "sdpa_cudnn", "flex"])
def test_cuda_only_attention_is_refused_on_cpu_even_when_importable(requested, monkeypatch):
    """The flash-attn package importable (and cuDNN present) but the run on a CPU device: a one-line refusal, not
    a backend whose kernels need CUDA."""
    monkeypatch.setattr(accel, "flash_attn_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    with pytest.raises(accel.UserError, match="needs"):
        accel.resolve_attention(requested, torch.device("cpu"), "bfloat16")
    with pytest.raises(accel.UserError, match="needs"):
        accel.resolve_attention(requested, None, "bfloat16")


def test_auto_attention_picks_flash_only_on_cuda(monkeypatch):
    """`auto`: flash-attn on a CUDA device in bf16 when it is available; SDPA on the CPU (or no device) even then."""
    monkeypatch.setattr(accel, "flash_attn_available", lambda: True)
    assert accel.resolve_attention("auto", torch.device("cuda"), "bfloat16") == "flash_attention_2"
    assert accel.resolve_attention("auto", torch.device("cpu"), "bfloat16") == "sdpa"
    assert accel.resolve_attention("auto", None, "bfloat16") == "sdpa"
    monkeypatch.setattr(accel, "flash_attn_available", lambda: False)
    assert accel.resolve_attention("auto", torch.device("cuda"), "bfloat16") == "sdpa"


def test_plain_backends_are_taken_as_asked_and_unknown_ones_refused():
    for name in ("sdpa", "eager"):
        assert accel.resolve_attention(name, torch.device("cpu"), "float32") == name
    with pytest.raises(accel.UserError, match="unknown backend"):
        accel.resolve_attention("xformers", torch.device("cpu"), "float32")


@pytest.mark.parametrize("sequence_parallel, recompute", list(itertools.product([False, True], repeat=2)))
def test_decoder_layer_linears_get_the_collectives_and_kept_input_asked_for(sequence_parallel, recompute):
    """`parallel.model._tensor_parallel_layer`: QKV and gate/up become column-parallel (input copied, or gathered
    over the sequence under SP), o and down row-parallel (output all-reduced, or reduce-scattered under SP), and
    with activation recomputation the SP column linears keep the gathered input for backward (the recomputed
    forward gathers it anyway; without recomputation they keep only the shard). Numerics are the same either way,
    so no layout run notices a wrong choice: only the memory and an extra all-gather per linear in backward."""
    from nanotronix.config import ModelConfig
    from nanotronix.model import build_model
    from nanotronix.parallel.model import _tensor_parallel_layer
    from nanotronix.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=16,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.05)
    layer = build_model(cfg).layers["0"]
    dense = {n: p.detach().clone() for n, p in layer.named_parameters()}
    _tensor_parallel_layer(layer, None, sequence_parallel, recompute)
    column = [layer.self_attn.qkv_proj, layer.mlp.gate_up_proj]
    row = [layer.self_attn.o_proj, layer.mlp.down_proj]
    assert all(type(m) is ColumnParallelLinear for m in column) and all(type(m) is RowParallelLinear for m in row)
    for m in column:
        assert m.input_mode == ("gather_sequence" if sequence_parallel else "copy")
        assert m.keep_gathered_input == recompute
        assert m.weight.tp_shard_dim == 0
    for m in row:
        assert m.output_mode == ("reduce_scatter_sequence" if sequence_parallel else "reduce")
        assert m.weight.tp_shard_dim == 1
    for name, p in layer.named_parameters():  # one rank: the whole weights, unchanged
        assert torch.equal(p, dense[name]), name


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_parallelize_asks_the_layers_to_keep_the_gathered_input_exactly_under_recomputation(recompute, monkeypatch):
    """`parallelize` passes train.recompute != "none" on to every decoder layer's TP wiring (above): one process,
    the layer wiring recorded as it is called."""
    from dist_common import make_config
    from nanotronix.model import build_model
    from nanotronix.parallel import model as model_module

    seen = []
    real = model_module._tensor_parallel_layer
    monkeypatch.setattr(model_module, "_tensor_parallel_layer",
                        lambda layer, group, sp, keep: (seen.append(keep), real(layer, group, sp, keep)))
    cfg = make_config({"train.recompute": recompute})
    model_module.parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
    assert seen == [recompute != "none"] * cfg.model.num_hidden_layers
