"""Pipeline partition (balanced, counting embedding and head) and the clear errors for impossible layouts, which
are raised by `resolve_layout` before any process group or model exists (no processes needed, < 1 s)."""
from __future__ import annotations

import pytest

from nanotronix.config import PRESETS, ConfigError, ModelConfig, config_from_dict
from nanotronix.config_checks import resolve_layout
from nanotronix.parallel.partition import block_costs, chunk_ids_of_rank, partition_layers, pipeline_chunks

from dist_common import TINY_MODEL


def cfg(parallel=None, train=None, model=None):
    return config_from_dict({
        "model": {**TINY_MODEL, **(model or {})},
        "parallel": parallel or {},
        "train": {"seq_len": 16, "global_batch_size": 8, "micro_batch_size": 1, **(train or {})},
    })


def test_equal_layers_split_evenly():
    assert partition_layers(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert partition_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert partition_layers(3, 3) == [[0], [1], [2]]


def test_head_cost_moves_layers_off_the_last_stage():
    # a head as expensive as 2 layers: the last stage gets 2 fewer layers than the first
    assert partition_layers(10, 2, head_cost=2.0) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    # an embedding as expensive as a layer: the first stage gets one fewer
    assert [len(c) for c in partition_layers(9, 2, embedding_cost=1.0)] == [4, 5]
    # the chunks before an expensive last one stay balanced among themselves (the docstring's tie-break), not cut as
    # early as possible: [0], [1-6], [7] has the same most expensive chunk
    assert partition_layers(8, 3, head_cost=10.0) == [[0, 1, 2], [3, 4, 5, 6], [7]]


def test_smollm2_135m_partition_is_balanced():
    model = ModelConfig(preset="smollm2-135m", **PRESETS["smollm2-135m"])
    embed, layer, head = block_costs(model, 2048)
    assert 5 < head / layer < 9  # the tied head is a real 576 x 49152 GEMM: several layers' worth
    chunks = pipeline_chunks(model, 2048, pp=2, virtual_stages=1)
    assert sum(map(len, chunks)) == 30 and chunks[0][0] == 0 and chunks[-1][-1] == 29
    costs = [len(chunks[0]) * layer + embed, len(chunks[1]) * layer + head]
    assert len(chunks[0]) > len(chunks[1])
    assert max(costs) - min(costs) <= layer  # nothing better exists than one layer of imbalance


def test_every_chunk_gets_a_layer_and_interleaved_placement():
    chunks = partition_layers(8, 8, head_cost=100.0)
    assert all(len(c) == 1 for c in chunks)
    assert chunk_ids_of_rank(1, pp=4, virtual_stages=2) == [1, 5]
    with pytest.raises(ValueError, match="cannot split 3 layers into 4"):
        partition_layers(3, 4)


@pytest.mark.parametrize("world, parallel, train, model, message", [
    (6, {"tp": 4}, None, None, "world size 6 is not divisible by tp*pp = 4*1"),
    # too few processes for one replica is not a divisibility problem: the preflight's words, without the nodes
    (2, {"tp": 2, "pp": 2}, None, None, "parallel: tp*pp = 2*2 = 4 needs at least 4 processes, the job has 2"),
    (4, {"tp": 2, "dp": 1}, None, None, "parallel.dp: 1 but world size 4"),
    (8, {"tp": 8}, None, None, "parallel.tp: 8 does not divide model.num_key_value_heads=4"),
    (3, {"tp": 3}, None, None, "parallel.tp: 3 does not divide model.num_attention_heads=8"),
    (2, {"pp": 2}, None, {"num_hidden_layers": 1}, "1 layers cannot fill 2 pipeline stages"),
    (4, {"pp": 2, "pp_schedule": "interleaved", "virtual_stages": 5}, None, None,
     "8 layers cannot fill 10 pipeline stages"),
    (2, {"tp": 2, "sequence_parallel": True}, {"seq_len": 15}, None, "seq_len=15 is not divisible by tp=2"),
    (4, {"pp": 4}, {"global_batch_size": 2}, None, "1f1b with pp=4 needs at least 4 micro-batches per step, but "
     "global_batch_size / (micro_batch_size*dp) = 2 (train.global_batch_size 4 would give 4)"),
    (2, {"pp": 2, "pp_schedule": "interleaved"}, None, None, "interleaved needs pp >= 2 and virtual_stages >= 2"),
    (4, {"pp": 4, "pp_schedule": "interleaved", "virtual_stages": 2}, {"global_batch_size": 9}, None,
     "9 micro-batches per step is not a multiple of 2 rounds (train.global_batch_size 8 or 10 would give 8 or 10)"),
    # 13 in rounds of 3 (13 // 4) does not fit: 12 below does, and above 14 (rounds of 3) does not, 15 does
    (4, {"pp": 4, "pp_schedule": "interleaved", "virtual_stages": 2}, {"global_batch_size": 13}, None,
     "(train.global_batch_size 12 or 15 would give 12 or 15)"),
    (4, {}, {"global_batch_size": 6}, None, "global_batch_size: 6 is not divisible by micro_batch_size*dp = 1*4"),
])
def test_wrong_layout_is_a_clear_error(world, parallel, train, model, message):
    config = cfg(parallel, train, model)
    with pytest.raises(ConfigError) as info:
        resolve_layout(config, world)
    assert message in str(info.value)


def test_good_layouts_resolve():
    assert resolve_layout(cfg({"tp": 2, "pp": 2}), 8) == 2
    assert resolve_layout(cfg({"pp": 4, "pp_schedule": "interleaved", "virtual_stages": 2}), 4) == 1
    for suggested in (8, 10, 12, 15):  # what the refusals above suggest
        interleaved = {"pp": 4, "pp_schedule": "interleaved", "virtual_stages": 2}
        assert resolve_layout(cfg(interleaved, {"global_batch_size": suggested}), 4) == 1
    assert resolve_layout(cfg({"pp": 2, "pp_schedule": "afab"}, {"global_batch_size": 1}), 2) == 1
