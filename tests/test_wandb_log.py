"""Weights & Biases logging (`logging.wandb_project`) against wandb itself: a real offline run of the trainer, read
back from the run file wandb wrote (its own protobuf records, in its LevelDB-log framing), holds every metrics.jsonl
record's numbers against the record's step; a resumed run continues the same W&B run (same id); bad settings are
one line. ~15 s."""
import json
import struct
from pathlib import Path

import pytest

from helpers import run, tiny_config, torchrun, write_learnable_store

pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb; the test extras install it)")


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows (name -> value, nested names joined by "/") of a .wandb run file: a 7-byte W&B header, then
    records framed as in LevelDB's log (32 KiB blocks; a record is a 7-byte header - checksum, length, type - and its
    bytes, split over blocks as FIRST/MIDDLE/LAST), each a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, parts, rows = 32768, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if length == kind == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def test_an_offline_run_holds_the_records_and_a_resume_continues_it(tmp_path, store):
    cfg = tiny_config(tmp_path, store, checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 2})
    w = ["logging.wandb_project=nanotronix-test", "logging.wandb_mode=offline"]
    first = torchrun(1, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=4", *w])
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (tmp_path / "logs" / "wandb" / "run_id").read_text().strip()
    runs = sorted((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith("-" + run_id)
    second = torchrun(1, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=6", *w])
    assert second.returncode == 0, second.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)  # the same W&B run, continued
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    rows = [row for run in runs for row in wandb_history(next(run.glob("run-*.wandb")))]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    for record, row in zip(records, rows):
        for key in ("loss", "lr", "grad_norm", "consumed_tokens", "tokens_per_sec"):
            assert row[key] == record[key], (key, row, record)
        (path, counts), = record["datasets"].items()  # nested numbers are named by their path
        assert row[f"datasets/{path}/consumed_tokens"] == counts["consumed_tokens"]
        assert "mfu" not in row and "stage" not in row  # null and text: not numbers


def test_online_without_an_api_key_is_one_line_before_any_step(tmp_path, store, monkeypatch):
    """Rank 0 alone starts W&B: on 2 ranks its line is the only one (rank 1, stopped at its first collective, said
    'another rank stopped' too)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = tiny_config(tmp_path, store)
    proc = torchrun(2, ["-m", "nanotronix.train", "--config", str(cfg), "logging.wandb_project=p"])
    assert proc.returncode == 1, proc.stderr[-2000:]  # torchrun's (its workers exited 2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: logging.wandb_project: W&B did not start ("), errors
    assert "wandb login" in errors[0] and "logging.wandb_mode=offline" in errors[0]
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    (["logging.wandb_project=p", "logging.wandb_mode=cloud"],
     "error: logging.wandb_mode: 'cloud' is not online|offline"),
    (["logging.wandb_name=run-1"], "error: logging.wandb_name: needs logging.wandb_project (W&B logging is off "
                                   "without it)"),
])
def test_bad_wandb_settings_are_one_line(tmp_path, store, override, message):
    cfg = tiny_config(tmp_path, store)
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), *override])
    assert proc.returncode == 2 and message in proc.stderr.splitlines(), proc.stderr[-2000:]


@pytest.mark.parametrize("damage, said", [("folder", "Is a directory"), ("empty", "empty"), ("blank", "empty"),
                                          ("not_text", "not text"), ("dangling", "No such file or directory")])
def test_a_damaged_saved_run_id_is_one_line_naming_it(tmp_path, damage, said):
    """LOGGING_DIR/wandb/run_id (the W&B run a resume continues) as a damaged or hand-edited folder leaves it: one line
    naming it, before W&B starts (W&B refused an empty id with a line that said to log in; a folder in its place
    raised IsADirectoryError from saving a new id over it), and the folder left as it was."""
    from nanotronix.config import LoggingConfig
    from nanotronix.errors import UserError
    from nanotronix.train.wandb_log import WandbLog

    saved = tmp_path / "logs" / "wandb" / "run_id"
    saved.parent.mkdir(parents=True)
    {"folder": saved.mkdir, "empty": lambda: saved.write_bytes(b""), "blank": lambda: saved.write_bytes(b" \n"),
     "not_text": lambda: saved.write_bytes(b"\xff\xfe1"), "dangling": lambda: saved.symlink_to(tmp_path / "gone")}[
        damage]()
    before = sorted(saved.parent.iterdir())
    with pytest.raises(UserError) as caught:
        WandbLog(LoggingConfig(dir=str(tmp_path / "logs"), wandb_project="p", wandb_mode="offline"), {})
    assert str(caught.value) == (f"{saved}: no W&B run id to continue ({said}): delete it to start a new W&B run in "
                                 "this logging.dir, or write the run's id into it")
    assert sorted(saved.parent.iterdir()) == before
    (tmp_path / "logs" / "wandb").rename(tmp_path / "moved")
    (tmp_path / "logs" / "wandb").write_text("")  # a file where the W&B folder goes
    with pytest.raises(UserError, match=f"^logging.wandb_project: cannot make {tmp_path / 'logs' / 'wandb'} "):
        WandbLog(LoggingConfig(dir=str(tmp_path / "logs"), wandb_project="p", wandb_mode="offline"), {})
