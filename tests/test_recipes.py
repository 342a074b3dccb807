"""The SmolLM2 recipes in examples/configs/ carry the published numbers, and the 1.7B data stages switch at the
right steps with the right mixtures as the sampler actually serves them (~10 s).

References: the published SmolLM2 values, tagged as in the recipes: [P] arXiv 2502.02737v1, [R] the nanotron
configs of huggingface/smollm @ a041759, [MC] the model cards. Nothing here is read back from the YAML files.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from nanotronix.checkpoint import CheckpointError
from nanotronix.config import load_config, grad_accum_steps
from nanotronix.config_checks import resolve_layout
from nanotronix.train.lr_schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"

# name: (file, architecture [R][MC], parameters [D from the architecture], published run [R][P])
PUBLISHED = {
    "135m": dict(file="smollm2_135m.yaml", layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3,
                 init_std=0.041666666666666664, params=134_515_008, gpus=64, micro_batch=8,
                 tokens_per_step=1_048_576, steps=2_000_000, lr=3e-3, decay_start=1_600_000, decay_steps=400_000,
                 seed=8, data_seed=8, nominal_tokens=2e12),
    "360m": dict(file="smollm2_360m.yaml", layers=32, hidden=960, ffn=2560, heads=15, kv_heads=5,
                 init_std=0.03227, params=361_821_120, gpus=128, micro_batch=6,
                 tokens_per_step=1_572_864, steps=2_600_000, lr=3e-3, decay_start=2_080_000, decay_steps=520_000,
                 seed=8, data_seed=8, nominal_tokens=4e12),
    "1p7b": dict(file="smollm2_1p7b.yaml", layers=24, hidden=2048, ffn=8192, heads=32, kv_heads=32,
                 init_std=0.02, params=1_711_376_384, gpus=256, micro_batch=4,
                 tokens_per_step=2_097_152, steps=5_240_000, lr=5e-4, decay_start=4_716_000, decay_steps=524_000,
                 seed=42, data_seed=8, nominal_tokens=11e12),
}

# SmolLM2-1.7B stages [P 4.2-4.5, Figure 2]: stage boundaries in tokens, bucket shares, FineWeb-Edu : DCLM ratio.
TOKENS_PER_STEP_1P7B = 2_097_152
STAGES_1P7B = [
    dict(name="stage1_stable", start_tokens=0, buckets={"web": 0.90, "code": 0.10}, fw_dclm=(60, 40)),
    dict(name="stage2_stable", start_tokens=6e12, buckets={"web": 0.75, "code": 0.20, "math": 0.05},
         fw_dclm=(60, 40)),
    dict(name="stage3_stable", start_tokens=8e12, buckets={"web": 0.74, "code": 0.16, "math": 0.10},
         fw_dclm=(40, 60)),
    # Stage 4 starts with the LR decay of the released config [R]: lr_decay_starting_step 4,716,000.
    dict(name="stage4_decay", start_step=4_716_001,
         buckets={"web": 0.58, "code": 0.24, "math": 0.14, "textbooks": 0.04}, fw_dclm=(40, 60)),
]
BUCKET = {  # the recipe's stores by the paper's buckets
    "fineweb-edu": "web", "dclm-baseline": "web", "starcoderdata": "code", "stack-edu": "code",
    "starcoder2-small-langs": "code", "starcoder2-jupyter": "code", "open-web-math": "math",
    "infimm-webmath": "math", "finemath-4plus": "math", "infiwebmath-3plus": "math", "aug-gsm8k": "math",
    "cosmopedia-v2": "textbooks",
}
STAGE4_PUBLISHED_SOURCES = {"open-web-math": 0.0008, "aug-gsm8k": 0.0002, "cosmopedia-v2": 0.04, "stack-edu": 0.24}


def first_step_after(tokens: float) -> int:
    """The step that consumes token number `tokens` (step s reads tokens [(s-1)*T, s*T), s from 1)."""
    return int(tokens // TOKENS_PER_STEP_1P7B) + 1


def stage_starts() -> list[int]:
    return [s.get("start_step") or first_step_after(s["start_tokens"]) for s in STAGES_1P7B]


def load(name: str, *overrides: str):
    return load_config(CONFIGS / PUBLISHED[name]["file"], ["data.root=/corpus", *overrides])


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_recipe_matches_published_numbers(name):
    pub = PUBLISHED[name]
    cfg = load(name)
    m, t, o, s = cfg.model, cfg.train, cfg.optimizer, cfg.lr_schedule
    assert (m.num_hidden_layers, m.hidden_size, m.intermediate_size, m.num_attention_heads,
            m.num_key_value_heads) == (pub["layers"], pub["hidden"], pub["ffn"], pub["heads"], pub["kv_heads"])
    assert (m.vocab_size, m.tie_word_embeddings, m.rms_norm_eps) == (49152, True, 1e-5)
    assert (m.max_position_embeddings, m.rope_theta) == (2048, 10000.0)  # pretraining, before the 8k extension
    assert m.init_std == pytest.approx(pub["init_std"])
    assert m.num_parameters() == pub["params"]
    # batch: dp x micro-batch x 2048 on the published GPU count, no gradient accumulation [R]
    assert t.seq_len == 2048 and t.micro_batch_size == pub["micro_batch"]
    assert t.global_batch_size * t.seq_len == pub["tokens_per_step"]
    dp = resolve_layout(cfg, pub["gpus"])
    assert (dp, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage) == (pub["gpus"], 1, 1, 0)
    assert grad_accum_steps(cfg, dp) == 1
    assert t.train_steps == pub["steps"]
    total = t.train_steps * pub["tokens_per_step"]
    assert abs(total - pub["nominal_tokens"]) / pub["nominal_tokens"] < 0.05  # "2T" / "4T" / "~11T" [P]
    assert (t.seed, cfg.data.data_seed, t.dtype) == (pub["seed"], pub["data_seed"], "bfloat16")
    # AdamW and the WSD schedule [P][R]
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.clip_grad) == (pub["lr"], [0.9, 0.95], 1e-8, 0.01, 1.0)
    assert o.weight_decay_norms  # [R]: no exclusion list in the nanotron of that time: every parameter decays
    assert (s.warmup_steps, s.decay_start_step, s.decay_steps, s.decay_style, s.min_lr) == (
        2000, pub["decay_start"], pub["decay_steps"], "linear", 0.0)
    assert s.decay_start_step + s.decay_steps == t.train_steps  # decay to 0 at the last step
    assert lr_at(1000, o.lr, s) == pytest.approx(pub["lr"] / 2)
    assert lr_at(2000, o.lr, s) == pytest.approx(pub["lr"])
    assert lr_at(pub["decay_start"], o.lr, s) == pytest.approx(pub["lr"])
    assert lr_at(pub["decay_start"] + pub["decay_steps"] // 2, o.lr, s) == pytest.approx(pub["lr"] / 2)
    assert lr_at(t.train_steps, o.lr, s) == 0.0
    assert cfg.checkpoint.interval == 2000 and cfg.checkpoint.resume == "auto"  # [R] (1.7B; [D] for the others)
    assert cfg.data.tokenizer == "HuggingFaceTB/cosmo2-tokenizer"  # [R]
    # the recipe's Slurm script asks for the published GPU count (nodes x GPUs per node), whose dp is the above
    header = (ROOT / "slurm" / f"smollm2_{name}.sh").read_text()
    nodes = re.search(r"^#SBATCH --nodes=(\d+)$", header, re.M)
    gres = re.search(r"^#SBATCH --gres=gpu:(\d+)$", header, re.M)
    assert nodes and gres and int(nodes[1]) * int(gres[1]) == pub["gpus"], (nodes, gres)
    assert f"RECIPE_CONFIG=$NANOTRONIX_DIR/examples/configs/{pub['file']}" in header


def test_1p7b_stage_steps_and_mixtures():
    cfg = load("1p7b")
    stages = cfg.data.stages
    assert [s.name for s in stages] == [s["name"] for s in STAGES_1P7B]
    assert [s.start_step for s in stages] == stage_starts() == [1, 2_861_023, 3_814_698, 4_716_001]
    for stage, pub in zip(stages, STAGES_1P7B):
        total = sum(d.weight for d in stage.datasets)
        share = {Path(d.path).name: d.weight / total for d in stage.datasets}
        buckets: dict[str, float] = {}
        for path, w in share.items():
            buckets[BUCKET[path]] = buckets.get(BUCKET[path], 0.0) + w
        assert buckets == pytest.approx(pub["buckets"], abs=1e-9), stage.name
        fw, dclm = share["fineweb-edu"], share["dclm-baseline"]
        assert fw / (fw + dclm) == pytest.approx(pub["fw_dclm"][0] / 100)
    stage4 = {Path(d.path).name: d.weight for d in stages[3].datasets}
    for path, weight in STAGE4_PUBLISHED_SOURCES.items():
        assert stage4[path] == pytest.approx(weight)
    # StarCoderData is replaced by Stack-Edu from stage 3 on [P 4.4]
    assert "starcoderdata" not in {Path(d.path).name for d in stages[2].datasets + stages[3].datasets}
    # dataset paths are relative to data.root
    assert all(d.path.startswith("/corpus/") for s in stages for d in s.datasets)


def test_context_8k_recipe(tmp_path, monkeypatch):
    cfg = load_config(CONFIGS / "smollm2_1p7b_context_8k.yaml", ["data.root=/corpus"])
    # it starts from imported stage-4 weights (checkpoint.resume names them), never silently from random ones
    from nanotronix.checkpoint.checkpointer import choose_resume_source
    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to where the job is submitted
    with pytest.raises(CheckpointError, match="checkpoint.resume: checkpoint not found: runs/smollm2-1.7b-8k/"):
        choose_resume_source(tmp_path / "checkpoints", cfg.checkpoint.resume, print)
    base = load("1p7b")
    m, t = cfg.model, cfg.train
    assert (m.max_position_embeddings, m.rope_theta, t.seq_len) == (8192, 130000.0, 8192)  # [P 4.6]
    assert m.num_parameters() == PUBLISHED["1p7b"]["params"]
    assert t.global_batch_size * t.seq_len == TOKENS_PER_STEP_1P7B
    assert t.train_steps * TOKENS_PER_STEP_1P7B == pytest.approx(50e9, rel=0.01)
    assert cfg.lr_schedule.decay_start_step + cfg.lr_schedule.decay_steps == t.train_steps
    # it continues stage 4's linear decay from the checkpoint it starts from, the last save "before the final 75
    # billion tokens" [P 4.6] of the 1.7B run (the step its keep_steps keeps)
    ckpt_step = int(base.train.train_steps - 75e9 / TOKENS_PER_STEP_1P7B) // base.checkpoint.interval \
        * base.checkpoint.interval
    assert ckpt_step in base.checkpoint.keep_steps
    assert cfg.optimizer.lr == pytest.approx(lr_at(ckpt_step, base.optimizer.lr, base.lr_schedule), rel=0.005)
    (stage,) = cfg.data.stages
    total = sum(d.weight for d in stage.datasets)
    share = {Path(d.path).name: d.weight / total for d in stage.datasets}
    long_docs = {"dclm-long-8k": 0.10, "fineweb-edu-long-8k": 0.10, "dolma-books": 0.20}  # [P 4.6]
    for path, w in long_docs.items():
        assert share.pop(path) == pytest.approx(w)
    stage4 = base.data.stages[3]
    s4_total = sum(d.weight for d in stage4.datasets)
    assert share == pytest.approx({Path(d.path).name: 0.6 * d.weight / s4_total for d in stage4.datasets})


# --------------------------------------------------------------------------------------------------------------
# The 1.7B stages as the sampler serves them: tiny stores whose token ids say which source they are.

TOKENS_PER_STORE = 20_000


@pytest.fixture(scope="module")
def corpus_1p7b(tmp_path_factory):
    from nanotronix.data.megatron_store import MegatronWriter

    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for k, name in enumerate(sorted(BUCKET)):
        writer = MegatronWriter(root / name, np.uint16)
        base = 1000 * (k + 1)  # every token of source k is in [base, base + 999]
        for _ in range(TOKENS_PER_STORE // 500):
            writer.add_document(np.append(rng.integers(base, base + 1000, 499), 0))
        writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": 49152, "eos_id": 0}})
    return root


def source_of_rows(rows: np.ndarray) -> list[str]:
    names = sorted(BUCKET)
    return [names[int(row[row > 0][0]) // 1000 - 1] for row in rows]


def test_1p7b_sampler_switches_stages_at_the_published_steps(corpus_1p7b):
    from nanotronix.data import build_train_loader

    cfg = load_config(CONFIGS / "smollm2_1p7b.yaml", [f"data.root={corpus_1p7b}"])
    gbs = cfg.train.global_batch_size
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1)
    starts = stage_starts()
    ends = [s - 1 for s in starts[1:]] + [cfg.train.train_steps]
    stage_weights = [{Path(d.path).name: d.weight for d in s.datasets} for s in cfg.data.stages]
    max_dev = 2 * int(np.ceil(np.log2(max(len(w) for w in stage_weights))))  # blend: within log2(K) per prefix
    for k, (first, last) in enumerate(zip(starts, ends)):
        weights = stage_weights[k]
        total = sum(weights.values())
        for step in (first, last):
            assert loader.stats(step)["stage"] == STAGES_1P7B[k]["name"], step
            # the batch actually read for this step: every row from this stage's sources, in its proportions
            rows = loader.batch(step).reshape(gbs, -1).numpy()
            counts = {name: 0 for name in BUCKET}
            for name in source_of_rows(rows):
                counts[name] += 1
            for name, n in counts.items():
                expected = gbs * weights.get(name, 0.0) / total
                assert abs(n - expected) <= max_dev, (step, name, n, expected)
        # the whole stage: consumed tokens per source from the sampler's bookkeeping
        before = loader.stats(first - 1)["datasets"] if first > 1 else None
        after = loader.stats(last)["datasets"]
        samples = (last - first + 1) * gbs
        for path, stats in after.items():
            name = Path(path).name
            got = (stats["consumed_tokens"] - (before[path]["consumed_tokens"] if before else 0)) / cfg.train.seq_len
            expected = samples * weights.get(name, 0.0) / total
            # the blend quantises weights to 1/2^24 of their sum: over billions of samples that is ~1e-7
            assert abs(got - expected) <= max_dev + samples / 2 ** 23, (STAGES_1P7B[k]["name"], name, got, expected)
    # a source left out of later stages keeps its count; a source that comes back continues its epochs
    end = loader.stats(cfg.train.train_steps)["datasets"]
    starcoder = "starcoderdata"  # named relative to data.root, as validation stores are
    assert end[starcoder]["consumed_tokens"] == loader.stats(starts[2] - 1)["datasets"][starcoder]["consumed_tokens"]
    owm = "open-web-math"
    windows = (TOKENS_PER_STORE - 1) // cfg.train.seq_len
    assert end[owm]["epochs"] == pytest.approx(end[owm]["consumed_tokens"] / cfg.train.seq_len / windows)


def test_data_root_joins_relative_paths_only(tmp_path, monkeypatch):
    import yaml

    from nanotronix.config import config_from_dict, dump_config

    monkeypatch.chdir(tmp_path)
    cfg = load("135m", "data.root=corpus", "data.stages.0.datasets.1.path=/abs/stack-edu",
               "data.stages.0.datasets.2.path=s3://bucket/infimm")
    paths = [d.path for d in cfg.data.stages[0].datasets]
    assert cfg.data.root == str(tmp_path / "corpus")  # made absolute once, so a dumped config reloads unchanged
    assert paths[:3] == [str(tmp_path / "corpus" / "dclm-edu"), "/abs/stack-edu", "s3://bucket/infimm"]
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert [d.path for d in again.data.stages[0].datasets] == paths
    url = load("135m", "data.root=s3://bucket/corpus/")
    assert url.data.stages[0].datasets[0].path == "s3://bucket/corpus/dclm-edu"
    plain = load_config(CONFIGS / "smollm2_135m.yaml")  # no root: paths stay as written
    assert plain.data.root is None and plain.data.stages[0].datasets[0].path == "dclm-edu"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_checkpoints_later_phases_start_from_are_kept(name):
    """A WSD run's other decays start from its last stable step, and the 1.7B 8k context extension from the stage-4
    step "before the final 75 billion tokens" [P 4.6]: the recipe saves and keeps both for good, which keep_last alone
    (the last 10 saves, 20,000 steps) would have pruned long before the run ends."""
    from nanotronix.checkpoint.paths import Retention
    pub = PUBLISHED[name]
    cfg = load_config(CONFIGS / pub["file"])
    keep = Retention.of(cfg.checkpoint)
    wanted = [pub["decay_start"]]
    if name == "1p7b":
        before_final_75b = pub["steps"] - 75e9 / pub["tokens_per_step"]  # 5,204,237
        wanted.append(int(before_final_75b) // cfg.checkpoint.interval * cfg.checkpoint.interval)
    for step in wanted:
        assert keep.milestone(step), (name, step)
        assert pub["steps"] - step > keep.keep_last * cfg.checkpoint.interval  # pruned without the milestone


def test_the_annealing_ablation_branches_off_the_1p7b_run_as_published():
    """smollm2_1p7b_anneal_math.yaml [P 3.1]: from the 3T-token checkpoint (kept by the 1.7B recipe), the learning
    rate decays linearly to 0 over 100B tokens of 60% candidate + 40% the pre-checkpoint mixture; everything the
    resumed data order depends on is the main run's."""
    from nanotronix.checkpoint.paths import Retention, step_of
    main = load_config(CONFIGS / "smollm2_1p7b.yaml")
    anneal = load_config(CONFIGS / "smollm2_1p7b_anneal_math.yaml")
    tokens_per_step = PUBLISHED["1p7b"]["tokens_per_step"]
    start = int(3e12 / tokens_per_step) // main.checkpoint.interval * main.checkpoint.interval
    assert step_of(Path(anneal.checkpoint.resume)) == start == 1_430_000
    assert Retention.of(main.checkpoint).milestone(start)
    assert anneal.train.train_steps - start == -(-int(100e9) // tokens_per_step)  # 47,684 steps = 100B tokens
    for field in ("seq_len", "global_batch_size", "seed"):
        assert getattr(anneal.train, field) == getattr(main.train, field), field
    assert (anneal.data.data_seed, anneal.optimizer) == (main.data.data_seed, main.optimizer)
    first = main.data.stages[0]
    assert anneal.data.stages[0] == first and main.data.stages[1].start_step > start  # stage 1 was being read
    stage = anneal.data.stages[1]
    assert stage.start_step == start + 1
    weights = {d.path: d.weight for d in stage.datasets}
    assert weights.pop("finemath-4plus") == pytest.approx(0.60)  # the candidate: 60B of 100B tokens
    assert weights == pytest.approx({d.path: 0.40 * d.weight for d in first.datasets})
    lr = anneal.optimizer.lr
    assert lr_at(start, lr, anneal.lr_schedule) == lr == lr_at(start, lr, main.lr_schedule)
    assert lr_at(start + 1, lr, anneal.lr_schedule) == pytest.approx(lr * (1 - 1 / 47_684))
    assert lr_at(anneal.train.train_steps, lr, anneal.lr_schedule) == 0.0


@pytest.mark.parametrize("file", sorted(p.name for p in CONFIGS.glob("smollm2_*.yaml")))
def test_every_recipe_stage_is_a_whole_mixture(file):
    """Each stage's weights are its shares and sum to 1 (the blend would scale them, and say so in a note), as the
    published mixtures do [P Figure 2, 4.6]."""
    from nanotronix.config import config_notes
    cfg = load_config(CONFIGS / file, ["data.root=/corpus"])
    for stage in cfg.data.stages:
        assert sum(d.weight for d in stage.datasets) == pytest.approx(1.0, abs=1e-9), (file, stage.name)
    assert not [n for n in config_notes(cfg) if "weights sum" in n]
