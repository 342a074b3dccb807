"""Config refusals and plan numbers that no other test held (cases a mutation review found untested; each < 1 s):
the layout's divisibility checks against a brute-force statement of what tensor parallelism splits, value bounds the
trainer's own libraries state (torch's AdamW betas, RoPE's pairs of dimensions), strict types of the YAML/override
reading, and tools/plan.py's source shares and network link against arithmetic written out here."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load_tool
from test_config import tiny_yaml  # noqa: F401  (a fixture: the tiny config of test_config.py as a file)
from nanotronix.config import ConfigError, config_notes, load_config
from nanotronix.config_checks import check_parallel_shape, resolve_layout

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"

@pytest.fixture(scope="module")
def plan_tool():
    return load_tool("plan")


def test_tp_must_divide_every_dimension_it_splits(tiny_yaml):
    """Megatron-style TP shards attention by heads (query and KV), the MLP by intermediate columns and the
    embedding/head by vocabulary rows: a layout is runnable iff tp divides all four. Brute force over a grid of
    dimensions and tp: resolve_layout (and check_parallel_shape, --print-config's check) accepts exactly those. A
    dropped intermediate or vocab check let a plan/--print-config through for a layout no launch can build."""
    for tp, inter, vocab, (heads, kv) in itertools.product((1, 2, 3, 4), (96, 97, 90), (256, 255, 258),
                                                           ((4, 2), (4, 4), (6, 3), (6, 2))):
        hidden = 16 * heads  # head_dim 16: even, hidden divisible by heads
        cfg = load_config(tiny_yaml, [f"parallel.tp={tp}", f"model.intermediate_size={inter}",
                                      f"model.vocab_size={vocab}", f"model.num_attention_heads={heads}",
                                      f"model.num_key_value_heads={kv}", f"model.hidden_size={hidden}"])
        runnable = all(n % tp == 0 for n in (heads, kv, inter, vocab))
        for check in (lambda: check_parallel_shape(cfg), lambda: resolve_layout(cfg, tp)):
            if runnable:
                check()
            else:
                with pytest.raises(ConfigError, match=r"^parallel\.tp: \d+ does not divide model\."):
                    check()


@pytest.mark.parametrize("override, said", [
    # RoPE positions beyond the model's: the preset's 2048-position model would train at 4096 without a word
    ("train.seq_len=129", "train.seq_len: 129 exceeds model.max_position_embeddings=128"),
    # RoPE rotates pairs of dimensions: an odd head dim has a dimension with no partner
    ("model.hidden_size=60", "model.hidden_size: head dim 15 must be even for RoPE"),
    # the module docstring: "steps are counted from 1"; a first stage from step 5 left steps 1-4 without data
    ("data.stages.0.start_step=5", "data.stages.0.start_step: the first stage must start at step 1"),
    # YAML-typed values are not coerced: 1.5 steps is not 1 step, 1 is not true
    ("train.train_steps=1.5", "train.train_steps: expected an integer, got 1.5"),
    ("train.compile=1", "train.compile: expected true or false, got 1"),
])
def test_values_the_run_cannot_mean_are_refused(tiny_yaml, override, said):
    with pytest.raises(ConfigError) as e:
        load_config(tiny_yaml, [override])
    assert said in str(e.value)


@pytest.mark.parametrize("betas", [[0.9, 1.0], [1.0, 0.95], [0.9, 0.95], [0.0, 0.999], [-0.1, 0.9], [0.9, 1.5]])
def test_adam_betas_are_those_torch_accepts(tiny_yaml, betas):
    """torch.optim.AdamW (the reference) refuses a beta outside [0, 1): at 1 its bias correction 1 - beta^t is 0 and
    every update divides by it. The config refuses the same betas at load time, not after the rendezvous."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], betas=tuple(betas))
        torch_accepts = True
    except ValueError:
        torch_accepts = False
    try:
        load_config(tiny_yaml, [f"optimizer.betas={betas}"])
        accepted = True
    except ConfigError as e:
        assert "optimizer.betas" in str(e)
        accepted = False
    assert accepted == torch_accepts, betas


def test_an_override_value_may_hold_an_equals_sign(tiny_yaml):
    """`key=value` splits at the first '=': a path holding '=' (hive-style partitions, `lang=py`) is the value's."""
    cfg = load_config(tiny_yaml, ["data.stages.0.datasets.0.path=/corpus/lang=py/shard"])
    assert cfg.data.stages[0].datasets[0].path == "/corpus/lang=py/shard"


def test_a_stage_starting_at_the_last_step_is_trained_and_not_said_unreached(tiny_yaml, plan_tool):
    """A stage with start_step s feeds steps s, s+1, ... (nanotronix/config.py's docstring): one starting at the last
    step trains that step, so no note may call it never trained; one after it is; the plan agrees."""
    stages = ("data.stages=[{name: a, start_step: 1, datasets: [{path: x}]}, "
              "{name: last, start_step: 3, datasets: [{path: y}]}, {name: late, start_step: 4, datasets: [{path: z}]}]")
    cfg = load_config(tiny_yaml, [stages])
    notes = [n for n in config_notes(cfg) if "never trained" in n]
    assert notes == ["data stages that start after the last step 3 are never trained: late (from step 4)"], notes
    assert [s["steps"] for s in plan_tool.stage_plan(cfg)] == [2, 1, 0]


def test_plan_source_shares_are_weights_over_their_sum(tmp_path, plan_tool):
    """Weights need not sum to 1 (only their ratios count: config_notes says so): a stage of weights 3 and 1 gives
    its sources 3/4 and 1/4 of its samples; the plan's share is that ratio, and its sample counts follow it."""
    tree = {"model": {"preset": "smollm2-135m"},
            "train": {"seq_len": 2048, "global_batch_size": 64, "micro_batch_size": 1, "train_steps": 100},
            "data": {"stages": [{"name": "s", "start_step": 1,
                                 "datasets": [{"path": str(tmp_path / "a"), "weight": 3.0},
                                              {"path": str(tmp_path / "b"), "weight": 1.0}]}]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    (stage,) = plan_tool.build_plan(str(path), [], 1, 0.45, "H100 SXM")["stages"]
    assert [src["share"] for src in stage["sources"]] == [0.75, 0.25]
    samples = 100 * 64
    assert [src["samples"] for src in stage["sources"]] == pytest.approx([samples * 3 / 4, samples / 4], abs=8)


@pytest.mark.parametrize("tp, gpus", [(1, 8), (2, 16), (4, 16), (2, 8), (8, 64)])
def test_the_dp_traffic_link_is_the_network_when_a_dp_group_spans_nodes(plan_tool, tp, gpus):
    """Ranks are numbered tp fastest (nanotronix/parallel/context.py: dp rank = (rank // tp) % dp): rank 0's DP group
    is ranks 0, tp, 2 tp, ... Brute force: its ranks' nodes (rank // gpus_per_node); more than one node means its
    traffic goes through the network, else the node's NVLink. Dropping tp from that test put tp=2 x dp=8 on 16 GPUs
    on NVLink."""
    plan = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), [f"parallel.tp={tp}"], gpus, 0.45, "H100 SXM",
                                gpus_per_node=8)
    dp = plan["layout"]["dp"]
    assert dp == gpus // tp
    nodes = {(r * tp) // 8 for r in range(dp)}
    assert plan["comm"]["link"] == ("network" if len(nodes) > 1 else "NVLink"), (tp, dp, nodes)


def test_preflight_line_states_the_layout_and_accumulation_of_the_whole_job(tmp_path):
    """The launch preflight's summary for 2 nodes x 2 processes at tp 2: world 4, dp = 4 / 2 = 2, accumulation
    = global batch 8 / (micro-batch 2 x dp 2) = 2: written out here, the line must say the same."""
    from helpers import tiny_config, write_learnable_store
    from nanotronix.preflight import preflight

    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "arith"), train={"device": "cpu"})
    line = preflight(str(cfg), ["parallel.tp=2"], nnodes=2, nproc_per_node=2).splitlines()[0]
    world, tp = 2 * 2, 2
    dp = world // tp
    accum = 8 // (2 * dp)
    assert f"2 node(s) x 2 = {world} processes on cpu | tp={tp} pp=1 dp={dp}, grad accumulation {accum} |" in line, \
        line


def test_preflight_wants_a_gpu_per_process_on_the_node(monkeypatch):
    """On CUDA each of a node's processes takes its own GPU: 8 processes on a node showing 4 GPUs are refused before
    torchrun starts (4 would share, or fail at set_device after the rendezvous)."""
    from nanotronix.config import Config
    from nanotronix.preflight import PreflightError, check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    cfg = Config()
    assert check_devices(cfg, 4) == "NVIDIA H100 80GB HBM3"
    with pytest.raises(PreflightError, match="8 processes per node need 8 GPUs, this node shows 4"):
        check_devices(cfg, 8)


def test_a_sigterm_stop_counts_workers_that_had_already_finished():
    """nanotronix.launch's stopped_by_sigterm (its docstring): after the agent's SIGTERM each worker exited 75 (it
    saved), -SIGTERM (no handler yet, or its teardown) or 0 (the run had finished): a stop as planned; any other
    code, or none at all, is a failure whose torchrun report is kept."""
    import signal

    from nanotronix.launch import stopped_by_sigterm

    for codes in ([75, 75], [0, 75], [0, 0], [0, -signal.SIGTERM], [-signal.SIGTERM, 75]):
        assert stopped_by_sigterm(codes), codes
    for codes in ([], [1, 75], [0, 1], [-signal.SIGKILL, 75]):
        assert not stopped_by_sigterm(codes), codes
