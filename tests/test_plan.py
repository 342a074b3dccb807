"""tools/plan.py against the SmolLM2 facts: 5.24M steps ~ 10.99T tokens, stage starts ~ 2,861,023 / 3,814,697 /
4,716,000, sources' epochs from real store sizes, memory and time arithmetic, one-line errors (~10 s)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import load_tool, run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
GIB = 1024 ** 3


@pytest.fixture(scope="module")
def plan_tool():
    return load_tool("plan")


def test_1p7b_plan_matches_the_published_schedule(plan_tool):
    plan = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["data.root=/nonexistent"], 256, 0.45,
                                "H100 SXM")
    # [R] 5,240,000 steps x 2,097,152 tokens = 10.989T tokens ("~11T" [P])
    assert plan["total_tokens"] == 5_240_000 * 2_097_152
    assert plan["total_tokens"] / 1e12 == pytest.approx(10.99, abs=0.005)
    assert plan["layout"] == {"tp": 1, "pp": 1, "dp": 256, "zero_stage": 0, "micro_batch_size": 4, "grad_accum": 1}
    stages = plan["stages"]
    # stage boundaries at 6T and 8T tokens [P], the decay phase after step 4,716,000 [R]
    assert [s["first_step"] - 1 for s in stages] == pytest.approx([0, 2_861_023, 3_814_697, 4_716_000], abs=1)
    assert stages[1]["tokens_before"] == pytest.approx(6e12, abs=2_097_152)
    assert stages[2]["tokens_before"] == pytest.approx(8e12, abs=2_097_152)
    assert stages[3]["tokens_before"] == 4_716_000 * 2_097_152
    assert [s["last_step"] for s in stages][-1] == 5_240_000
    assert sum(s["steps"] for s in stages) == 5_240_000
    assert sum(s["tokens"] for s in stages) == plan["total_tokens"]
    for s in stages:
        assert sum(src["samples"] for src in s["sources"]) == s["steps"] * 1024
        for src in s["sources"]:
            # exact up to the blend's quantisation of weights to 1/2^24 of their sum
            samples = s["steps"] * 1024
            assert src["samples"] == pytest.approx(samples * src["share"], abs=8 + samples / 2 ** 23)
            assert src["status"] == "store not found" and src["epochs"] is None
    # memory for dp=256, no ZeRO: fp32 weights and grads, two fp32 AdamW moments, bf16 copies
    mem = plan["memory"]["bytes"]
    n = 1_711_376_384
    assert plan["memory"]["params_per_gpu"] == n
    assert (mem["weights_fp32"], mem["grads_fp32"], mem["optimizer_adamw"]) == (4 * n, 4 * n, 8 * n)
    assert mem["weights_bf16_copies"] == 2 * (n - 49 * 2048)  # autocast casts every weight but the 49 norms'
    assert 10 * GIB < mem["activations"] < 40 * GIB
    assert mem["total"] < 80 * GIB  # the published layout fits an 80 GB H100
    # time: 6 N_matmul + causal attention FLOPs per token, at 45% of 989.4 TFLOP/s on 256 GPUs
    matmul = 24 * (2048 * 3 * 2048 + 2048 * 2048 + 3 * 2048 * 8192) + 2048 * 49152
    per_token = 6 * matmul + 6 * 24 * 2048 * 2048
    tm = plan["time"]
    assert tm["flops_per_token"] == per_token
    assert tm["total_flops"] == pytest.approx(1.1e23, rel=0.1)  # [P] "around 1e23 FLOPs"; 6ND = 1.13e23 [D]
    hours = plan["total_tokens"] * per_token / (256 * 989.4e12 * 0.45) / 3600
    assert tm["wall_hours"] == pytest.approx(hours) and tm["gpu_hours"] == pytest.approx(256 * hours)
    assert sum(tm["stage_wall_hours"].values()) == pytest.approx(hours)


def test_zero1_and_pipeline_change_memory(plan_tool):
    # the plain loss (the recipe turns the fused one on; `lean` below measures what it saves)
    base = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["train.loss_chunk_size=0"], 256, 0.45,
                                "H100 SXM")["memory"]
    zero = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["parallel.zero_stage=1"], 256, 0.45,
                                "H100 SXM")["memory"]
    assert zero["bytes"]["optimizer_adamw"] == pytest.approx(base["bytes"]["optimizer_adamw"] / 256)
    pp = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["parallel.pp=4", "train.micro_batch_size=1"],
                              256, 0.45, "H100 SXM")["memory"]
    assert pp["in_flight_microbatches"] == 4 and pp["stage"] == "first"  # 1F1B: the first stage holds pp
    # the last stage (its head and loss) can be the heavier one: its count is its own, one micro-batch in flight
    last = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["parallel.pp=2", "train.loss_chunk_size=0",
                                "model.num_hidden_layers=2", "train.micro_batch_size=1"], 256, 0.45,
                                "H100 SXM")["memory"]
    assert last["stage"] == "last" and last["in_flight_microbatches"] == 1
    assert pp["params_per_gpu"] < base["params_per_gpu"] / 3
    cached = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["parallel.pp=4", "train.micro_batch_size=1",
                                  "train.bf16_weight_cache=true"], 256, 0.45, "H100 SXM")["memory"]
    # autocast's copies live per in-flight micro-batch (4 on the first stage); the cache's once
    layer_copies = 2 * 6 * (3 * 2048 * 2048 + 2048 * 2048 + 3 * 2048 * 8192)
    assert pp["bytes"]["weights_bf16_copies"] - cached["bytes"]["weights_bf16_copies"] == pytest.approx(
        3 * layer_copies)
    lean = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["train.recompute=full",
                                "train.loss_chunk_size=1024"], 256, 0.45, "H100 SXM")["memory"]
    # full recompute keeps each layer's fp32 input (4 x 2048 B per token) instead of its whole set; the fused loss
    # drops the [8192 x 49152] logits (bf16 + fp32 + fp32 softmax = 10 B per element)
    assert base["bytes"]["activations"] - lean["bytes"]["activations"] > 8192 * 49152 * 8 + 8192 * 23 * 90_000
    assert lean["bytes"]["activations"] < base["bytes"]["activations"] / 4


def test_data_parallel_traffic_against_compute(plan_tool):
    """NCCL's ring all-reduce moves 2 (n-1)/n of the buffer through each rank's link (nccl-tests' bus-bandwidth
    convention); the published 1.7B layout (dp 256 over 32 nodes, 4 sequences per GPU and step) cannot hide it,
    and the capped MFU lands near the ~25% that SmolLM2's reported cost implies (~$250k for ~1e23 FLOPs at ~$2 per
    H100-hour: an order of magnitude, hence the wide bounds)."""
    def plan(gpus, *overrides, **kw):
        return plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), list(overrides), gpus, 0.45, "H100 SXM", **kw)

    n = 1_711_376_384
    c = plan(256)["comm"]
    assert c["link"] == "network" and c["gbytes_per_s"] == 50
    assert c["bytes_per_gpu"] == pytest.approx(2 * 255 / 256 * 4 * n)
    assert c["comm_seconds"] == pytest.approx(2 * 255 / 256 * 4 * n / 50e9)
    compute = 1024 * 2048 / 256 / (989.4e12 * 0.45 / plan(256)["time"]["flops_per_token"])
    assert c["compute_seconds"] == pytest.approx(compute)
    assert c["exposed_seconds"] == pytest.approx(c["comm_seconds"] - 2 / 3 * compute)  # accumulation 1
    assert c["mfu"] == pytest.approx(0.45 * compute / (compute + c["exposed_seconds"]))
    assert 0.15 < c["mfu"] < 0.35
    time = plan(256)["time"]  # the run at the pace the traffic leaves: as much longer as the MFU is lower
    assert c["wall_hours"] / time["wall_hours"] == pytest.approx(0.45 / c["mfu"])
    assert c["gpu_hours"] == pytest.approx(c["wall_hours"] * 256)
    # ZeRO-1: the same bytes, the weight half hidden behind the next forward instead
    z = plan(256, "parallel.zero_stage=1")["comm"]
    assert z["bytes_per_gpu"] == pytest.approx(c["bytes_per_gpu"]) and c["mfu"] < z["mfu"] < 0.45
    assert plan(256, "parallel.zero_stage=1", "parallel.overlap_param_gather=false")["comm"]["mfu"] == \
        pytest.approx(c["mfu"])  # gathered before the forward: nothing hides the weight half
    # a twice faster network shortens what sticks out; 64 GPUs with accumulation 4 pay it once per 4 micro-batches
    # (only the last one's backward can hide it: the gradients are complete only then)
    assert plan(256, net_gbps=800)["comm"]["exposed_seconds"] < c["exposed_seconds"] / 2
    fewer = plan(64)["comm"]
    assert fewer["compute_seconds"] == pytest.approx(4 * compute) and c["mfu"] < fewer["mfu"] < 0.45
    assert plan(64, net_gbps=1600)["comm"]["exposed_seconds"] == 0
    # bf16 reduction: half the gradient bytes, which the last backward almost hides at this layout
    b = plan(256, "parallel.grad_reduce_dtype=bfloat16")["comm"]
    assert b["bytes_per_gpu"] == pytest.approx(c["bytes_per_gpu"] / 2)
    assert b["exposed_seconds"] == pytest.approx(c["comm_seconds"] / 2 - 2 / 3 * compute) and b["mfu"] > 0.4
    bz = plan(256, "parallel.grad_reduce_dtype=bfloat16", "parallel.zero_stage=1")["comm"]
    assert bz["bytes_per_gpu"] == pytest.approx(c["bytes_per_gpu"] * 3 / 4)  # the weights still gather in fp32
    # ... unless the bf16 weight cache gathers the decoder linears' weights in bf16 into its copies
    bzc = plan(256, "parallel.grad_reduce_dtype=bfloat16", "parallel.zero_stage=1",
               "train.bf16_weight_cache=true")["comm"]
    linear = 24 * (2048 * 3 * 2048 + 2048 * 2048 + 3 * 2048 * 8192)
    assert bzc["bytes_per_gpu"] == pytest.approx(bz["bytes_per_gpu"] - 255 / 256 * 2 * linear)
    assert bzc["mfu"] > bz["mfu"]
    # one node: NVLink
    assert plan(8)["comm"]["link"] == "NVLink" and plan(8)["comm"]["exposed_seconds"] == 0
    # ... at the node's own speed (data sheets): the A100's NVLink 3 is 2/3 of NVLink 4, and a PCIe card's ring
    # crosses PCIe Gen5 x16 (~64 GB/s per direction), which an 8-GPU node's backward no longer hides
    h100 = plan(8, "train.global_batch_size=64")["comm"]
    a100 = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["train.global_batch_size=64"], 8, 0.45,
                                "A100")["comm"]
    assert a100["bytes_per_gpu"] == pytest.approx(h100["bytes_per_gpu"])
    assert a100["comm_seconds"] == pytest.approx(1.5 * h100["comm_seconds"])
    pcie = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["train.global_batch_size=64"], 8, 0.45,
                                "H100 PCIe")["comm"]
    assert pcie["link"] == "PCIe" and pcie["comm_seconds"] > 7 * h100["comm_seconds"]
    assert plan(1, "train.global_batch_size=4")["comm"]["bytes_per_gpu"] == 0


def test_epochs_from_real_stores(plan_tool, tmp_path):
    from nanotronix.data.megatron_store import MegatronWriter

    sizes = {"dclm-edu": 50_000, "stack-edu": 30_001, "infimm-webmath": 12_000, "finemath": 9_000}
    for name, tokens in sizes.items():
        writer = MegatronWriter(tmp_path / name, np.uint16)
        writer.add_document(np.ones(tokens, dtype=np.uint16))
        writer.finalize()
    plan = plan_tool.build_plan(str(CONFIGS / "smollm2_135m.yaml"), [f"data.root={tmp_path}",
                                "train.train_steps=100", "lr_schedule.warmup_steps=10",
                                "lr_schedule.decay_start_step=80", "lr_schedule.decay_steps=20"], 64, 0.45, "H100 SXM")
    (stage,) = plan["stages"]
    for src in stage["sources"]:
        name = Path(src["path"]).name
        if name == "cosmopedia-v2":
            assert src["status"] == "store not found" and src["epochs"] is None
            continue
        windows = (sizes[name] - 1) // 2048  # a sample is a window of seq_len+1 tokens overlapping by one
        assert src["status"] == "ok" and src["store_tokens"] == sizes[name]
        assert src["epochs"] == pytest.approx(src["samples"] / windows)
        assert src["epochs_by_stage_end"] == src["epochs"]


def test_cli_prints_a_recipe(tmp_path):
    proc = run(["tools/plan.py", str(CONFIGS / "smollm2_135m.yaml"), "--gpus", "64"])
    assert proc.returncode == 0, proc.stderr
    assert "2,000,000 steps" in proc.stdout and "store not found" in proc.stdout and "GPU-hours" in proc.stdout


def test_errors_are_one_line(plan_tool, tmp_path, capsys):
    for args, message in [
        (["--gpus", "3"], "error: train.global_batch_size: 1024 is not divisible by micro_batch_size*dp = 4*3"),
        (["--gpus", "256", "--mfu", "2"], "error: --mfu must be in (0, 1], got 2.0"),
        (["--gpus", "256", "parallel.tq=2"], "error: parallel.tq: unknown config key"),
        (["--gpus", "256", "--gpu", "B300"], "error: --gpu 'B300' is not in the GPU table"),
        (["--gpus", "256", "--net-gbps", "0"], "error: --net-gbps must be > 0"),
        # a branch off a step past its own end: the trainer's refusal (it printed a plan of -583 hours)
        (["--gpus", "256", "checkpoint.resume=/x/step_9000000"], "error: train.train_steps=5240000, but the "
         "checkpoint resumed from is at step 9000000: past the end of the run, nothing to train"),
        # the preflight's and the trainer's refusal (it printed a whole plan without a stage)
        (["--gpus", "256", "data.stages=[]"], "error: data.stages: no stage configured"),
    ]:
        assert plan_tool.main([str(CONFIGS / "smollm2_1p7b.yaml"), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), lines
    with pytest.raises(SystemExit) as e:  # the config forgotten: the overrides are not what is missing
        plan_tool.main(["--gpus", "8"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: the following arguments are required: CONFIG\n"
    assert plan_tool.main([str(tmp_path / "missing.yaml"), "--gpus", "8"]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"
    with pytest.raises(SystemExit) as e:  # nan passed `<= 0` and printed nan figures
        plan_tool.main([str(CONFIGS / "smollm2_1p7b.yaml"), "--gpus", "256", "--net-gbps", "nan"])
    assert e.value.code == 2 and "argument --net-gbps: 'nan' is not a finite number" in capsys.readouterr().err
    assert plan_tool.main([str(CONFIGS / "smollm2_360m.yaml"), "--gpus", "128", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_tokens"] == 2_600_000 * 1_572_864 and plan["layout"]["grad_accum"] == 1


def test_checkpoint_disk_plan(plan_tool, tmp_path):
    """The 1.7B recipe saves every 2,000 steps (2,620 saves) and keeps the newest 10 plus its milestones (the 20
    multiples of 250,000 and steps 1,430,000, 4,716,000 and 5,204,000); a step's size is 12 bytes per parameter,
    checked against the files of a real checkpoint the trainer wrote."""
    plan = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["data.root=/nonexistent"], 256, 0.45,
                                "H100 SXM")["checkpoints"]
    assert (plan["saves"], plan["kept"], plan["milestones_kept"]) == (5_240_000 // 2_000, 10 + 23, 23)
    assert plan["bytes_kept"] == 33 * plan["bytes_per_checkpoint"]
    from checkpoint_helpers import train_in_process
    from helpers import tiny_config, write_learnable_store
    from nanotronix.config import load_config
    cfg_path = tiny_config(tmp_path, write_learnable_store(tmp_path / "arith"),
                           checkpoint={"dir": str(tmp_path / "ckpt")}, train={"train_steps": 2})
    train_in_process(cfg_path)
    written = sum(f.stat().st_size for f in (tmp_path / "ckpt" / "step_0000002").glob("*.distcp"))
    want = plan_tool.checkpoint_plan(load_config(cfg_path))["bytes_per_checkpoint"]
    assert want <= written <= 1.05 * want + 65536, (written, want)


def test_a_branch_off_another_run_is_planned_from_its_checkpoint(plan_tool):
    """smollm2_1p7b_anneal_math.yaml resumes the 1.7B run's step 1,430,000: its time is that of its own 47,684 steps
    (the 1.7B run's per-step time, taken from that recipe's plan) and it saves only those steps."""
    main = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["data.root=/nonexistent"], 64, 0.45, "H100 SXM")
    anneal = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b_anneal_math.yaml"), ["data.root=/nonexistent"], 64,
                                  0.45, "H100 SXM")
    assert anneal["resumed_step"] == 1_430_000 and main["resumed_step"] == 0
    per_step = main["time"]["wall_hours"] / 5_240_000
    assert anneal["time"]["wall_hours"] == pytest.approx(47_684 * per_step)
    assert anneal["time"]["stage_wall_hours"]["stage1_stable"] == 0
    assert anneal["checkpoints"]["saves"] == len(range(1_432_000, 1_477_684, 2_000)) + 1  # and the last step
    assert "starts from step 1,430,000 of another run" in plan_tool.format_plan(anneal)
    # a branch from the last step of its run: said complete as the trainer says it (before: "trains steps
    # 1,430,001-1,430,000")
    done = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b_anneal_math.yaml"),
                                ["data.root=/nonexistent", "train.train_steps=1430000"], 64, 0.45, "H100 SXM")
    text = plan_tool.format_plan(done)
    assert ("starts from step 1,430,000 of another run (checkpoint.resume) = train.train_steps: the run is complete, "
            "nothing left to train") in text and "this run trains steps" not in text, text
    assert done["time"]["wall_hours"] == 0 and done["checkpoints"]["saves"] == 0, (done["time"], done["checkpoints"])


def test_a_stage_the_run_never_reaches_is_said_as_such(plan_tool):
    """A run shorter than its schedule (a test of a recipe, train.train_steps=1000): the stages that start after its
    last step are said never reached (before: "steps 2,861,023-1,000 (0 steps)", "starts after" more tokens than
    the run trains)."""
    plan = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["train.train_steps=1000"], 256, 0.45,
                                "H100 SXM")
    assert [s["steps"] for s in plan["stages"]] == [1000, 0, 0, 0]
    text = plan_tool.format_plan(plan)
    later = [line for line in text.splitlines() if line.startswith("stage ")][1:]
    assert len(later) == 3 and all(" never reached (it starts at step " in line and
                                   line.endswith(", after the last step 1,000)") for line in later), later


def test_the_memory_line_says_which_gpu_and_its_micro_batches_in_words(plan_tool):
    """The text's memory line names the GPU it is of and the micro-batches it holds: at pp 1 no pipeline stage (it
    said "first pipeline stage" of a run without a pipeline); a whole count of micro-batches as such ("1 micro-batch",
    not "1 micro-batch(es)"); an interleaved rank's mean over its chunks to 2 decimals, saying it is one (it said
    "3.66667 micro-batch(es)"); a middle pipeline rank by its 0-based number and the range of them (it said "pipeline
    rank 2 of 4", which reads as the second of four). --json keeps its figures and words as they are."""
    def memory(gpus: int, overrides: list[str]) -> tuple[dict, str]:
        plan = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"), ["data.root=/nonexistent", *overrides], gpus,
                                    0.45, "H100 SXM")
        lines = [line for line in plan_tool.format_plan(plan).splitlines() if line.startswith("memory per GPU")]
        assert len(lines) == 1, lines
        return plan["memory"], lines[0]

    mem, line = memory(256, [])
    assert mem["in_flight_microbatches"] == 1 and mem["stage"] == "first"  # the JSON's, as before
    assert line.startswith("memory per GPU (estimate, no pipeline parallelism, 1,711.4M parameters, 1 micro-batch "
                           "in flight): "), line
    mem, line = memory(256, ["parallel.pp=4", "train.micro_batch_size=1"])
    assert line.startswith("memory per GPU (estimate, first pipeline stage, ") and \
        ", 4 micro-batches in flight): " in line, line
    mem, line = memory(16, ["parallel.pp=4", "parallel.pp_schedule=interleaved", "parallel.virtual_stages=3"])
    held = mem["in_flight_microbatches"]
    assert held != int(held) and mem["pp_rank"] == 2 and mem["stage"] == "rank 2 of 4", mem
    assert line.startswith("memory per GPU (estimate, pipeline rank 2 (ranks 0-3), ") and \
        f", {held:.2f} micro-batches in flight, the mean over its interleaved chunks): " in line, line
    assert f"{held:g}" not in line, line


def test_activations_are_an_upper_bound_under_compile(plan_tool):
    """The activations are eager's count (tests/test_plan_memory_compiled.py: a compiled layer keeps less): the
    memory line says so for a run with train.compile (the recipes), and --json has it, not for one without."""
    for compiled in (True, False):
        plan = plan_tool.build_plan(str(CONFIGS / "smollm2_1p7b.yaml"),
                                    ["data.root=/nonexistent", f"train.compile={str(compiled).lower()}"], 256, 0.45,
                                    "H100 SXM")
        line = next(line for line in plan_tool.format_plan(plan).splitlines() if line.startswith("memory per GPU"))
        assert plan["memory"]["activations_upper_bound"] is compiled
        assert ("(as eager keeps them: at most that under train.compile)" in line) is compiled, line
