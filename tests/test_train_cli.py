"""The trainer end to end on a tiny store (single process, ~15 s), and its one-line errors on bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import METRICS_FIELDS, NANOTRONIX_FRAME, TINY_MODEL, run, tiny_config, torchrun, write_learnable_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def test_torchrun_trains_and_logs_metrics(tmp_path, store):
    cfg = tiny_config(tmp_path, store)
    proc = torchrun(1, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=30"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert set(rows[0]) == METRICS_FIELDS  # the README names each
    assert rows[-1]["consumed_tokens"] == 30 * 8 * 32
    assert rows[0]["mfu"] is None and rows[0]["peak_memory_gb"] is None  # CPU: peak FLOP/s unknown, no GPU memory
    assert all(0 <= r["data_wait_ms"] < 1e3 for r in rows)  # read ahead: a step waits little for its batch
    assert rows[-1]["stage"] == "arith"
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.7, (first, last)  # ln(256) = 5.5 at the start; the progressions are learnable
    assert rows[1]["lr"] == pytest.approx(3e-3) and rows[0]["lr"] == pytest.approx(1.5e-3)


def test_document_masking_counts_fewer_attention_flops(tmp_path, store):
    """The store's documents (20-120 tokens, EOS 0) split the 32-token windows: with document masking the logged
    model FLOPs per token are each step's sum(l_i^2)/S span, recomputed here from the loader's own batches
    (a step whose windows happen to hold no EOS logs the whole-window figure), and below whole-window causal
    attention's over the run. The expectation is rebuilt from the data rather than fixed, so it holds for any
    store and shuffle key."""
    from nanotronix.config import load_config
    from nanotronix.data.loader import build_train_loader
    from nanotronix.train.flops import document_attention_span, flops_per_token, matmul_params

    overrides = ["train.train_steps=4", "model.document_mask_eos_id=0"]
    cfg_path = tiny_config(tmp_path, store)
    proc = torchrun(1, ["-m", "nanotronix.train", "--config", str(cfg_path), *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(str(cfg_path), overrides)
    loader = build_train_loader(cfg, 0, 1)
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["model_tflops_per_gpu"] * 1e12 / r["tokens_per_sec_per_gpu"] for r in rows]
    spans = [document_attention_span(loader.read_batch(r["step"])[..., :-1], 0) for r in rows]
    assert logged == pytest.approx([flops_per_token(cfg.model, 32, s) for s in spans], rel=1e-9)
    whole_window = flops_per_token(cfg.model, 32)
    assert all(6 * matmul_params(cfg.model) < f <= whole_window * (1 + 1e-9) for f in logged), logged
    assert sum(logged) / len(logged) < whole_window * (1 - 1e-3), logged  # 32 windows without one EOS: ~1e-8


@pytest.mark.parametrize("override, message", [
    (["model.hidden_sise=64"], "error: model.hidden_sise: unknown config key"),
    (["model.num_attention_heads=3"], "error: model.hidden_size: 64 is not divisible by model.num_attention_heads=3"),
    (["parallel.tp=2"], "error: parallel: tp*pp = 2*1 = 2 needs at least 2 processes, the job has 1"),
    (["data.stages.0.datasets.0.path=/nonexistent/store"], "/nonexistent/store"),
    (["validation.interval=5"], "error: validation.data: missing (validation.interval > 0 needs a list of held-out "
                                "token stores)"),
    (["validation.interval=5", "validation.data=arith"], "error: validation.data: expected a list, got 'arith'"),
    (["validation.interval=5", "validation.data=[arith]", "validation.num_samples=100000"],
     "error: validation.num_samples: 100000 windows of 32 tokens need 3200001 tokens"),
    (["logging.profile_steps=5-3"], "error: logging.profile_steps: '5-3' is not within 1 <= A <= B <= "
                                    "train.train_steps=20"),
    (["logging.profile_steps=3", "logging.profile_ranks=[1]"],
     "error: logging.profile_ranks: [1] names a rank this run does not have (its ranks are 0-0)"),
    (["logging.profile_steps=3", "logging.memory_snapshot=true"],
     "error: logging.memory_snapshot: records the CUDA caching allocator; this run is on cpu"),
])
def test_bad_input_is_one_line(tmp_path, store, override, message):
    cfg = tiny_config(tmp_path, store)
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), *override])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize("override, message", [
    (["model.hidden_sise=64"], "error: model.hidden_sise: unknown config key"),  # before the process group exists
    (["parallel.tp=2"], "error: parallel: world size 3 is not divisible by tp*pp = 2*1"),  # after: the layout
    (["model.vocab_size=128"], "error: token store "),  # each rank opening the store: agreed on after (256 tokens)
])
def test_bad_input_met_by_every_rank_is_said_once(tmp_path, store, override, message):
    """3 ranks read the same config (and stores): rank 0 says what is wrong, the others exit without repeating it (on
    a cluster, one line instead of one per GPU), after it, so that torchrun does not stop rank 0 before it has said
    it."""
    cfg = tiny_config(tmp_path, store)
    proc = torchrun(3, ["-m", "nanotronix.train", "--config", str(cfg), "train.global_batch_size=12", *override])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and errors[0].startswith(message), proc.stderr[-3000:]


def test_a_diverging_run_stops_with_one_line_before_updating(tmp_path, store):
    """lr 1e30: step 1 throws the weights to ~1e30, step 2's loss overflows. The trainer stops there without applying
    step 2's update or saving it: one error line, exit 1, the checkpoint of step 1 intact and the latest."""
    cfg = tiny_config(tmp_path, store, checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 1})
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), "optimizer.lr=1e30", "lr_schedule.warmup_steps=0",
                "train.train_steps=5"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: step 2: the loss (") and "not finite" in errors[0], errors
    assert "e.g. 'train.skip_steps=[2-5]';" in errors[0]  # quoted: zsh would read an unquoted [2-5] as a glob
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_")) == ["step_0000001"]


def test_out_of_memory_is_one_line_with_where_and_what_to_change(tmp_path, store):
    """A GPU out of memory in step 3 (raised by tests/oom_worker.py with torch's wording): one line saying where,
    torch's sizes (not its allocator advice) and the switches that lower memory; exit 2, as for a config too big."""
    cfg = tiny_config(tmp_path, store)
    proc = run([str(Path(__file__).parent / "oom_worker.py"), "--config", str(cfg), "train.train_steps=5"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: out of memory in step 3 (train step): CUDA out of memory. Tried to allocate "
                               "3.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.02 GiB is free."), lines
    assert "expandable_segments" not in lines[0] and "train.micro_batch_size" in lines[0]
    assert [json.loads(r)["step"] for r in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("layout, where", [([], []), (["parallel.pp=2"], ["--in-forward"])], ids=["dp2", "pp2"])
def test_an_out_of_memory_on_one_rank_is_its_one_line_and_it_exits_first(tmp_path, store, layout, where):
    """Rank 1 alone meets the out of memory (DP2: in its training step; PP2: in the last stage's forward, which
    torch.distributed.pipelining re-raises wrapped); rank 0's next collective or send fails (gloo: connection closed
    by peer). Rank 1 says its one line, and notes in the job's store that it did, so rank 0, stopped by it, keeps
    quiet (before: a second line, "another rank stopped", from every rank it stopped); no traceback; rank 0 exits
    after rank 1, so that torchrun's report names rank 1 as the root cause."""
    cfg = tiny_config(tmp_path, store)
    proc = torchrun(2, [str(Path(__file__).parent / "oom_worker.py"), "--only-rank=1", *where, "--config", str(cfg),
                        "train.train_steps=5", *layout])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: rank 1: out of memory in step 3 (train step): CUDA out of memory."), errors
    assert not NANOTRONIX_FRAME.search(proc.stderr.split("ChildFailedError")[0])  # no traceback of a worker's
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : 2" in root_cause, root_cause


def test_a_rank_stopped_by_another_says_so_in_one_line_and_exits_after_it(tmp_path, store):
    """Rank 1 alone meets a defect of the code in its training step (a plain RuntimeError: its traceback, and
    nothing noted in the job's store); rank 0's next collective fails (gloo: connection closed by peer), and it says
    so in one line, no traceback, and exits after rank 1, so that torchrun's report names rank 1 as the root cause."""
    cfg = tiny_config(tmp_path, store)
    proc = torchrun(2, [str(Path(__file__).parent / "oom_worker.py"), "--only-rank=1", "--bug", "--config", str(cfg),
                        "train.train_steps=5"])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    stopped = ("error: rank 0: in step 3 (train step): another rank stopped (its error says why), so this one stops "
               "too: ")
    # gloo says either, by when the socket went: "Connection closed by peer" or "Read error ...: Connection reset"
    assert errors[0].startswith(stopped) and "Connection " in errors[0][len(stopped):], errors
    assert "RuntimeError: a defect in the training step" in proc.stderr  # rank 1's own traceback
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : 1" in root_cause, root_cause


def test_an_error_line_is_one_write(monkeypatch):
    """Ranks that fail at the same moment share torchrun's stderr pipe: an error line written in two parts (print's
    text, then its newline, on an unbuffered stderr) lets another rank's line land in between."""
    import sys
    from nanotronix.errors import fail

    class Stderr:
        writes: list[str] = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Stderr())
    assert fail("token store x: bad") == 2
    assert Stderr.writes == ["error: token store x: bad\n"]


STOPPED = "PeerStopped, every_rank=True: at start-up (data): bad input stopped "


@pytest.mark.parametrize("size, failed, outcome", [
    (3, [0, 1, 2], "DataError, every_rank=True"),
    (3, [0, 2], "DataError, every_rank=False"),
    (3, [1], STOPPED + "rank 1 (its error says why), so this one stops too"),
    (11, list(range(1, 11)), STOPPED + "ranks 1, 2, 3, 4, 5, 6, 7, 8 and 2 more (their errors say why), so this one "
                                       "stops too"),
    (3, [], "went on"),
])
def test_stopping_together_says_an_error_every_rank_met_once(size, failed, outcome):
    """Rank 0 of `size` ranks, of which `failed` met bad input: an error every rank met becomes every_rank (rank 0
    alone says it), one that some ranks met is said by each of them, and the others stop (rank 0 says it for them)."""
    from nanotronix.data import DataError
    from nanotronix.distributed import PeerStopped, stopping_together

    class Group:  # rank 0's all-gather, with the other ranks' answers
        def __init__(self):
            self.size = size

        def all_gather(self, met):
            return [met] + [r in failed for r in range(1, size)]

    try:
        with stopping_together(Group(), "at start-up (data)"):
            if 0 in failed:
                raise DataError("token store x: bad")
        said = "went on"
    except DataError as e:
        said = f"DataError, every_rank={e.every_rank}"
    except PeerStopped as e:
        said = f"PeerStopped, every_rank={e.every_rank}: {e}"
    assert said == outcome


def test_peer_stopped_tells_a_lost_peer_from_a_bug():
    import torch.distributed as dist
    from nanotronix.distributed import peer_stopped

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:11649. This is typically caused by a remote worker crashing. Check the logs")
    assert peer_stopped(gloo) == "Connection closed by peer [127.0.0.1]:11649"
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise RuntimeError("[Stage 0] failed to run backward") from e
    except RuntimeError as wrapped:
        assert peer_stopped(wrapped) == "Connection closed by peer [127.0.0.1]:11649"
    assert peer_stopped(dist.DistNetworkError("failed to recv, got 0 bytes")) == "failed to recv, got 0 bytes"
    assert peer_stopped(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_stopped(ValueError("broken pipe in a config value")) is None


def test_an_out_of_memory_re_raised_by_a_pipeline_stage_is_found():
    """torch.distributed.pipelining's stage re-raises an error of its forward as `raise RuntimeError(msg) from e`
    (torch/distributed/pipelining/stage.py): the trainer still finds the out of memory behind it."""
    import torch
    from nanotronix.train.trainer import out_of_memory_behind

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    try:
        try:
            raise oom
        except Exception as e:
            raise RuntimeError("[Stage 1] failed to run forward") from e
    except RuntimeError as wrapped:
        assert out_of_memory_behind(wrapped) is oom
    assert out_of_memory_behind(RuntimeError("something else")) is None


def test_missing_config_file(tmp_path):
    proc = run(["-m", "nanotronix.train", "--config", str(tmp_path / "missing.yaml")])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"


def test_print_config_shows_what_the_run_would_use_and_launches_nothing(tmp_path, store):
    """--print-config: the whole config, preset fields filled in, overrides applied and dataset paths joined to
    data.root, as YAML that loads back into the same config; no torchrun, no run folders."""
    import yaml
    from nanotronix.config import PRESETS, config_from_dict, load_config

    cfg = tiny_config(tmp_path, store, checkpoint={"dir": str(tmp_path / "ckpt")})
    tree = yaml.safe_load(cfg.read_text())
    tree["model"] = {"preset": "smollm2-135m"}
    cfg.write_text(yaml.safe_dump(tree))
    overrides = ["model.num_hidden_layers=2", "train.train_steps=7"]
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), "--print-config", *overrides])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["train_steps"] == 7 and printed["model"]["num_hidden_layers"] == 2
    assert printed["model"]["vocab_size"] == PRESETS["smollm2-135m"]["vocab_size"]  # the preset, filled in
    assert printed["data"]["stages"][0]["datasets"][0]["path"] == str(store)  # joined to data.root
    assert config_from_dict(printed) == load_config(cfg, overrides)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()
    bad = run(["-m", "nanotronix.train", "--config", str(cfg), "--print-config", "train.train_stepz=7"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: train.train_stepz: unknown config key")
    # a layout no world size can run (the model's split over tp and pp) is refused here as torchrun would refuse it
    bad = run(["-m", "nanotronix.train", "--config", str(cfg), "--print-config", "parallel.tp=7"])
    assert bad.returncode == 2 and bad.stderr == "error: parallel.tp: 7 does not divide model.num_attention_heads=9\n"
    bad = run(["-m", "nanotronix.train", "--config", str(cfg), "--print-config", "parallel.pp_schedule=interleaved"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: parallel.pp_schedule: interleaved needs pp >= 2")


def test_tensorboard_gets_every_number_nested_ones_by_path():
    from nanotronix.train.metrics import _scalars

    record = {"step": 4, "loss": 2.5, "stage": "web", "mfu": None, "flag": True, "val_loss": 3.0,
              "val_losses": {"web": 2.0, "code": 4.0}, "datasets": {"web": {"consumed_tokens": 64, "epochs": 0.5}}}
    assert dict(_scalars(record)) == {"step": 4, "loss": 2.5, "val_loss": 3.0, "val_losses/web": 2.0,
                                      "val_losses/code": 4.0, "datasets/web/consumed_tokens": 64,
                                      "datasets/web/epochs": 0.5}


def test_tensorboard_holds_each_step_once_after_a_resume_retrains_steps(tmp_path, store):
    """TensorBoard's scalars, read back by TensorBoard's own reader, are metrics.jsonl's: one point a step, the
    value of the step's last record. A resume re-trains the steps that the stopped run logged after its checkpoint
    (here after a rollback, at another learning rate so that the two runs' values differ): TensorBoard drops the
    stopped run's points of those steps (before, both runs' points were drawn for steps 4-6)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, store, train={"train_steps": 6}, logging={"tensorboard": True},
                      checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 3})
    first = run(["-m", "nanotronix.train", "--config", str(cfg)])
    assert first.returncode == 0, first.stderr[-3000:]
    back = run(["tools/rollback.py", str(tmp_path / "ckpt"), "--to-step", "3"])
    assert back.returncode == 0, back.stderr
    again = run(["-m", "nanotronix.train", "--config", str(cfg), "optimizer.lr=1e-3"])
    assert again.returncode == 0, again.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    last = {r["step"]: r for r in records}
    assert last[6]["loss"] != records[5]["loss"]  # the resumed run's values are other values
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    for tag in ("loss", "lr", "grad_norm"):
        points = [(e.step, e.value) for e in events.Scalars(tag)]
        assert points == [(step, pytest.approx(last[step][tag], rel=1e-6)) for step in range(1, 7)], (tag, points)


def test_start_notes_a_store_read_more_than_once_an_overridden_preset_and_a_stage_never_reached(tmp_path, capsys):
    """A run that takes more windows from a store than it holds reads it again (each epoch in a new order): said
    once at the start, as many times over as the last step's metrics record says. A preset named in a config whose
    own model fields win (a copied config: the model trained is not the preset's) is said with what differs, and so
    is sequence parallelism at tp=1. The launch preflight says the same notes, before the job waits in the queue
    (before, only the trainer did, maybe hours after the submission)."""
    from nanotronix import preflight

    small = write_learnable_store(tmp_path / "data" / "small", num_docs=8)  # a few hundred tokens
    stages = [{"name": "first", "start_step": 1, "datasets": [{"path": "small", "weight": 1.0}]},
              {"name": "late", "start_step": 50, "datasets": [{"path": "small", "weight": 1.0}]}]
    cfg = tiny_config(tmp_path, small, train={"train_steps": 4}, data={"stages": stages})
    overrides = ["model.preset=smollm2-135m", "parallel.sequence_parallel=true"]
    assert preflight.main(["--config", str(cfg), *overrides]) == 0  # before the run: no metrics.jsonl yet
    said = capsys.readouterr()
    assert said.err == "" and said.out.startswith("preflight ok: "), said
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) >= 4 and said.out.splitlines()[1:] == notes, (said.out, proc.stdout)
    assert (f"note: model.preset smollm2-135m, with explicit fields that win over it: hidden_size="
            f"{TINY_MODEL['hidden_size']} (the preset's 576), ") in proc.stdout, proc.stdout
    last = json.loads((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    epochs = last["datasets"]["small"]["epochs"]
    assert last["step"] == 4 and epochs > 1
    assert proc.stdout.count("is read") == 1, proc.stdout
    assert f"note: data: small is read {epochs:.2f} times over by step 4 (the run takes more windows" in proc.stdout
    # a stage that starts after the last step (a short test of a long recipe): never trained, said
    assert "note: data stages that start after the last step 4 are never trained: late (from step 50)" in proc.stdout
    # sequence parallelism asked for at tp=1 (a tp>1 recipe reused on one GPU): nothing to split, said
    assert "note: parallel.sequence_parallel is set but parallel.tp is 1: " in proc.stdout


def test_console_line_says_mfu_a_slow_rank_and_the_time_left():
    from nanotronix.train.metrics import console_line

    # 1024 x 2048 tokens per step at 2.1M tokens/s: 0.9986 s a step; 5,239,000 steps left -> 60.6 days
    record = {"step": 1000, "loss": 2.5, "lr": 3e-4, "grad_norm": 0.25, "consumed_tokens": 1000 * 1024 * 2048,
              "tokens_per_sec": 2.1e6, "mfu": 0.4634, "peak_memory_gb": 51.23, "data_wait_ms": 80.0,
              "data_wait_rank": 17}
    assert console_line(record, 5_240_000, 1024 * 2048) == (
        "step   1000/5240000 | loss 2.5000 | lr 3.000e-04 | grad norm 0.250 | 2,100,000 tok/s | MFU 46.3% | 51.2 GB "
        "| data wait 80 ms/step (rank 17) | ETA 60d 13h")
    quiet = dict(record, data_wait_ms=20.0, mfu=None, peak_memory_gb=None, step=5_239_000,
                 consumed_tokens=5_239_000 * 1024 * 2048)
    assert console_line(quiet, 5_240_000, 1024 * 2048).endswith("2,100,000 tok/s | ETA 16m 38s")  # 20 ms < 5%
    assert "ETA" not in console_line(dict(quiet, step=5_240_000), 5_240_000, 1024 * 2048)  # the last step
    # after the 8k stage's resume (2048 -> 8192 tokens a window, the pace in tokens/s about the same): the steps left
    # are 4x as long as the run's average step so far, and the ETA says so
    assert console_line(quiet, 5_240_000, 1024 * 8192).endswith("ETA 1h 06m")


def test_a_damaged_store_is_one_line_naming_it(tmp_path, store):
    """Token ids beyond the vocabulary in the .bin (a damaged store, its sidecar still fine): one line that names the
    store, not the embedding's IndexError on every rank."""
    import shutil

    damaged = tmp_path / "data" / "damaged"
    damaged.parent.mkdir()
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copyfile(f"{store}{suffix}", f"{damaged}{suffix}")
    tokens = np.memmap(f"{damaged}.bin", dtype=np.uint16, mode="r+")
    tokens[::50] = 65535
    tokens.flush()
    cfg = tiny_config(tmp_path, store)
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), f"data.stages.0.datasets.0.path={damaged}",
                "train.train_steps=2"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: token store {damaged}: token id 65535 (in the window at token "), lines


def test_host_memory_running_out_is_one_line(tmp_path, store):
    """A CPU allocation that fails (a model far too large for the host: a 512 GiB embedding, within what torch can
    size) is torch's plain RuntimeError, not its OutOfMemoryError: one line like a GPU's out of memory, not a
    traceback."""
    proc = run(["-m", "nanotronix.train", "--config", str(tiny_config(tmp_path, store)),
                f"model.hidden_size={2 ** 29}"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: out of memory at start-up (start): host memory: "), lines


def test_ranks_that_do_not_all_join_in_time_are_one_line(tmp_path, store):
    """A collective timeout shorter than the ranks take to meet (a node that starts late: here rank 1, 3 s after rank
    0, with 0.3 s to meet): the rank that gives up says so in one line naming the setting (before: torch's store or
    gloo traceback on each rank). The late rank is made late on purpose: with a timeout of a few milliseconds and
    no late rank, the ranks sometimes met in time and a later collective timed out instead (1 CI run in ~10)."""
    cfg = tiny_config(tmp_path, store)
    late = tmp_path / "late_rank.py"
    late.write_text("import os, sys, time\n"
                    "if os.environ['RANK'] == '1':\n    time.sleep(3)\n"
                    "from nanotronix.train.main import main\n"
                    "sys.argv = ['nanotronix.train', *sys.argv[1:]]\nsys.exit(main())\n")
    proc = torchrun(2, [str(late), "--config", str(cfg), "parallel.collective_timeout_minutes=0.005",
                        "logging.hang_report_seconds=0"], timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert all("the ranks did not all join within parallel.collective_timeout_minutes=0.005 (" in e
               for e in errors), errors
    assert "DistStoreError" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]


def test_ranks_that_do_not_all_create_a_group_in_time_are_one_line(tmp_path, store):
    """init_process_group may succeed and a later new_group (collective too: the parallel context's groups, the
    checkpointer's gloo group) time out on the rank that waits for a late one: the same one line, not gloo's
    traceback (the test above met that one run in three when the ranks happened to form the world in time)."""
    cfg = tiny_config(tmp_path, store)
    worker = tmp_path / "late_rank.py"
    worker.write_text(f"""
import time
import torch.distributed as dist
from nanotronix.config import load_config
from nanotronix.errors import UserError
from nanotronix.parallel import ParallelContext

dist.init_process_group("gloo")  # torch's default timeout: every rank gets here
if dist.get_rank() == 1:
    time.sleep(3)  # the late rank
try:
    ParallelContext.build(load_config({str(cfg)!r}, ["parallel.collective_timeout_minutes=0.005",
                                                "logging.hang_report_seconds=0"]))
except UserError as e:
    print(f"error: rank {{dist.get_rank()}}: {{e}}", flush=True)
""")
    proc = torchrun(2, [str(worker)], timeout=120)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: rank 0:")]
    assert errors and "the ranks did not all join within parallel.collective_timeout_minutes=0.005 (" in errors[0], \
        proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_run_folders_that_cannot_be_written_or_hold_another_run_stop_it_at_start(tmp_path, store):
    """A checkpoint.dir or logging.dir that cannot be created is one line before the first step (it used to be found
    at the first save, every step before it lost); resume=none into a folder holding checkpoints would commit the
    new run's steps among the old run's: refused."""
    cfg = tiny_config(tmp_path, store)
    (tmp_path / "a_file").write_text("x")
    for option in ("checkpoint.dir", "logging.dir"):
        proc = run(["-m", "nanotronix.train", "--config", str(cfg), f"{option}={tmp_path / 'a_file' / 'sub'}"])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0] == (f"error: {option}: cannot write to {tmp_path / 'a_file' / 'sub'} (a part of that path "
                            "is a file, not a folder)")
        assert "step 1/" not in proc.stdout
    ckpt = f"checkpoint.dir={tmp_path / 'ckpt'}"
    assert run(["-m", "nanotronix.train", "--config", str(cfg), ckpt, "train.train_steps=2"]).returncode == 0
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), ckpt, "train.train_steps=4", "checkpoint.resume=none"])
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: checkpoint.resume=none, but checkpoint.dir {tmp_path / 'ckpt'} already holds checkpoints (latest: "
        "step_0000002): set another checkpoint.dir, remove those, or checkpoint.resume=auto to continue them"), \
        proc.stderr
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), ckpt, "train.train_steps=4"])
    assert proc.returncode == 0 and "done: 4 steps (steps 3-4 in this run), loss " in proc.stdout, proc.stdout


def test_a_checkpoint_dir_made_with_new_levels_is_durable_from_the_start(tmp_path, store, monkeypatch):
    """The run makes checkpoint.dir at start-up (`create_run_folders`), so the first save finds it made: each level
    it made is fsynced into its parent there, or a power loss could take the folder with every step committed in it."""
    import os

    from nanotronix.checkpoint.storage import Collective
    from nanotronix.config import load_config
    from nanotronix.train.run_folders import create_run_folders

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    ckpt = tmp_path / "new" / "levels" / "ckpt"
    create_run_folders(load_config(tiny_config(tmp_path, store, checkpoint={"dir": str(ckpt)})),
                       Collective(single_process=True))
    assert ckpt.is_dir() and {tmp_path, tmp_path / "new", tmp_path / "new" / "levels"} <= set(synced), synced
