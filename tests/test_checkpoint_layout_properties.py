"""Property-based tests (hypothesis) of the checkpoint layout (checkpoint/state.py): `save_chunks` / `assign_writers` /
`WriterPlan` over generated TP x DP x PP layouts of meta-device modules (each chunk written once, by a holder, the
bytes balanced as the docstring says, the same on every rank), and `logical_shape` / `shard_dim_of` against
torch.chunk of a full tensor. CPU, no process group (WriterPlan's gathers among threads).

Derandomized with no example database (tests/properties.py). ~3 s on one core."""
from __future__ import annotations

import threading

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nanotronix.checkpoint.state import (LocalPiece, WriterPlan, assign_writers, logical_shape, save_chunks,
                                         shard_dim_of)
from properties import PROPERTY

# a parameter: (full shape, TP shard dim or None, trainable, element bytes, pipeline stage as a fraction of pp)
param_specs = st.lists(st.tuples(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.one_of(st.none(),
                                 st.integers(0, 2)), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16]),
                                 st.floats(0, 0.999)), min_size=1, max_size=8)
layouts = st.tuples(st.integers(1, 8), st.integers(1, 4), st.integers(1, 3))  # tp, dp, pp


def _rank_modules(specs, tp: int, dp: int, pp: int, tied_embedding: bool):
    """Each rank's module (rank = tp_rank + tp * (dp_rank + dp * pp_rank)) on the meta device: its stage's parameters
    at their TP-local shapes; a tied embedding on the first and the last stage. Returns the modules and each
    parameter's full bytes (weights and, if trainable, both moments)."""
    full_bytes = {}
    modules = []
    for rank in range(tp * dp * pp):
        tp_rank, pp_rank = rank % tp, rank // (tp * dp)
        module = nn.Module()
        for i, (dims, shard_dim, trainable, dtype, stage) in enumerate(specs):
            shard_dim = None if shard_dim is None else shard_dim % len(dims)
            full = [d * tp if k == shard_dim else d for k, d in enumerate(dims)]
            name, holders = f"p{i}", {int(stage * pp)}
            if tied_embedding and i == 0:
                name, holders = "embed", {0, pp - 1}
            full_bytes[name] = int(np.prod(full)) * torch.tensor([], dtype=dtype).element_size() * (3 if trainable
                                                                                                  else 1)
            if pp_rank in holders:
                param = nn.Parameter(torch.empty(dims, dtype=dtype, device="meta"), requires_grad=trainable)
                if shard_dim is not None:
                    param.tp_shard_dim = shard_dim
                module.register_parameter(name, param)
        modules.append((module, tp_rank))
    return modules, full_bytes


@settings(PROPERTY, max_examples=150)
@given(param_specs, layouts, st.booleans(), st.randoms(use_true_random=False))
def test_every_chunk_is_written_once_by_a_holder_and_the_load_balances(specs, layout, tied, rnd):
    tp, dp, pp = layout
    modules, full_bytes = _rank_modules(specs, tp, dp, pp, tied)
    chunks = [save_chunks(module, tp, tp_rank) for module, tp_rank in modules]
    for (module, _), mine in zip(modules, chunks):
        expected = {f"model.{n}" for n, _ in module.named_parameters()}
        expected |= {f"optim.{m}.{n}" for n, p in module.named_parameters() if p.requires_grad
                     for m in ("exp_avg", "exp_avg_sq")}
        assert set(mine) == expected
        assert all(size == p.numel() * p.element_size() for n, p in module.named_parameters()
                   for key, (_, size) in mine.items() if key.endswith("." + n))
    writes = assign_writers(chunks)
    holders: dict = {}
    for rank, mine in enumerate(chunks):
        assert writes[rank] <= set(mine)
        for key, (chunk, size) in mine.items():
            holders.setdefault((key, chunk), (size, []))[1].append(rank)
    for (key, _), (_, ranks) in holders.items():
        assert sum(key in writes[r] for r in ranks) == 1  # exactly one holder writes each distinct chunk
    load = [sum(chunks[r][key][1] for key in writes[r]) for r in range(len(chunks))]
    # what is written is the logical model: every parameter's full tensor and moments, once
    assert sum(load) == sum(full_bytes.values())
    # "by the holder with the fewest bytes assigned so far, largest first": a rank's load exceeds that of any other
    # holder of its last (smallest) chunk by at most that chunk
    order = sorted(holders, key=lambda kc: (-holders[kc][0], kc))
    for r, keys in enumerate(writes):
        if keys:
            last = max((kc for kc in order if kc[0] in keys and r in holders[kc][1]), key=order.index)
            assert all(load[r] - holders[last][0] <= load[h] for h in holders[last][1])
    # the same on every rank, whatever order each rank listed its keys in
    shuffled = []
    for mine in chunks:
        items = list(mine.items())
        rnd.shuffle(items)
        shuffled.append(dict(items))
    assert assign_writers(shuffled) == writes


@settings(PROPERTY, max_examples=150)
@given(st.integers(1, 12), st.lists(st.tuples(st.integers(0, 1 << 20), st.sets(st.integers(0, 11), min_size=1)),
                                    max_size=40))
def test_any_holding_of_chunks_gets_one_writer_each_and_bounded_loads(ranks, chunk_specs):
    """assign_writers over arbitrary holdings (any set of ranks holding each chunk, any sizes, ties included)."""
    chunks_by_rank: list[dict] = [{} for _ in range(ranks)]
    holders = {}
    for i, (size, held_by) in enumerate(chunk_specs):
        held_by = sorted({r % ranks for r in held_by})
        holders[f"model.c{i}"] = (size, held_by)
        for r in held_by:
            chunks_by_rank[r][f"model.c{i}"] = ((-1, 0, (size,)), size)
    writes = assign_writers(chunks_by_rank)
    load = [sum(holders[k][0] for k in keys) for keys in writes]
    for key, (size, held_by) in holders.items():
        assert [r for r in range(ranks) if key in writes[r]] in ([r] for r in held_by)
    order = sorted(holders, key=lambda k: (-holders[k][0], k))
    for r, keys in enumerate(writes):
        if keys:  # the rank's last (smallest) chunk went to it as the least loaded of its holders
            last = max(keys, key=order.index)
            assert all(load[r] - holders[last][0] <= load[h] for h in holders[last][1])


class _ThreadGroup:
    """all_gather among threads, one per rank (what WriterPlan needs of a process group)."""

    def __init__(self, size: int):
        self.barrier, self.slots = threading.Barrier(size), [None] * size

    def member(self, rank: int):
        group = self

        class Member:
            def __init__(self):
                self.rank, self.gathers = rank, 0

            def all_gather(self, obj):
                self.gathers += 1
                group.slots[rank] = obj
                group.barrier.wait()
                out = list(group.slots)
                group.barrier.wait()
                return out
        return Member()


@settings(PROPERTY, max_examples=25)
@given(param_specs, layouts, st.booleans())
def test_writer_plan_keeps_the_assignment_of_a_fresh_gather(specs, layout, tied):
    """The keys of a fresh gather and assignment, kept while no rank's chunks change (a save then gathers digests
    only), assigned anew when one rank's do (its first parameter frozen or unfrozen before the third save)."""
    tp, dp, pp = layout
    modules, _ = _rank_modules(specs, tp, dp, pp, tied)
    expected = assign_writers([save_chunks(m, tp, r) for m, r in modules])
    group = _ThreadGroup(len(modules))
    members = [group.member(r) for r in range(len(modules))]
    plans = [WriterPlan() for _ in modules]
    results: list = [[None] * 3 for _ in modules]
    changed = any(True for _ in modules[0][0].parameters())

    def save_three_times(rank):
        module, tp_rank = modules[rank]
        for k in range(3):
            if k == 2 and rank == 0 and changed:
                first = next(module.parameters())
                first.requires_grad_(not first.requires_grad)
            results[rank][k] = plans[rank].keys(module, tp, tp_rank, members[rank])

    threads = [threading.Thread(target=save_three_times, args=(r,)) for r in range(len(modules))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r[0] for r in results] == expected and [r[1] for r in results] == expected
    assert [r[2] for r in results] == assign_writers([save_chunks(m, tp, r) for m, r in modules])
    assert all(m.gathers == 3 + 1 + changed for m in members)  # digests only, unless a rank's chunks changed


@settings(PROPERTY, max_examples=100)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 3), st.integers(1, 8),
       st.integers(0, 2**32 - 1))
def test_logical_shape_of_a_tp_chunk_is_the_full_tensors(dims, dim, tp, seed):
    dim %= len(dims)
    dims[dim] *= tp  # TP splits into equal chunks
    full = torch.from_numpy(np.random.default_rng(seed).standard_normal(dims)).float()
    chunks = torch.chunk(full, tp, dim)
    param = nn.Parameter(chunks[0].clone())
    param.tp_shard_dim = dim
    assert shard_dim_of(param, tp) == (dim if tp > 1 else None)
    assert shard_dim_of(nn.Parameter(full.clone()), tp) is None
    for piece in chunks:
        assert logical_shape(LocalPiece(piece, shard_dim_of(param, tp)), tp) == full.shape
    assert torch.equal(torch.cat(chunks, dim), full)
    assert logical_shape(LocalPiece(full, None), tp) == full.shape
