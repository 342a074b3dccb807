"""The optional NVIDIA DALI loader (data.loader: dali) against the PyTorch loader, on CPU (`device_id=None`):
identical batches over several steps, after a resume at step k and after jumps; the trainer's losses with DALI
equal the PyTorch-loader run's, bit for bit. Tests that need DALI skip only
when `nvidia.dali` is not importable (install the `dali` extra: nvidia-dali-cuda120). The missing-DALI error is
tested everywhere. About 10 s on 2 cores (DALI's import dominates)."""
import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_config, write_learnable_store
from nanotronix import accel
from nanotronix.config import load_config
from nanotronix.data import build_prefetched_loader, build_train_loader
from nanotronix.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture
def dali():
    modules = accel.dali_modules()
    if modules is None:
        pytest.skip("NVIDIA DALI is not installed (nvidia.dali is not importable): pip install nvidia-dali-cuda120")
    return modules


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith", num_docs=150)


def _config(folder: Path, store: Path, *overrides: str, **sections):
    folder.mkdir(parents=True, exist_ok=True)
    return load_config(tiny_config(folder, store, **sections), list(overrides))


def test_dali_reader_equals_pytorch_loader_with_resume(dali, tmp_path, store):
    from nanotronix.data.dali_loader import DaliBatchReader

    cfg = _config(tmp_path, store, "train.global_batch_size=12", "train.micro_batch_size=2")
    plain = build_train_loader(cfg, 1, 2)  # DP rank 1 of 2: 6 samples per step, grad accumulation 3
    reader = DaliBatchReader(build_train_loader(cfg, 1, 2), CPU, last_step=8)
    assert reader.describe() == f"dali {dali.version} (cpu)"
    kept = {step: reader.read_batch(step) for step in range(1, 9)}  # up to the last step: no read past it
    for step, batch in kept.items():  # compared after all reads: no batch was overwritten by a later one
        assert batch.shape == (3, 2, 33) and batch.dtype == torch.int32 and batch.device.type == "cpu"
        assert torch.equal(batch, plain.batch(step)), step
    reader.close()

    # A resumed run: the loader restarts from its consumed-sample count (after step k = 5).
    resumed = DaliBatchReader(build_train_loader(cfg, 1, 2, consumed_samples=5 * 12), CPU)
    first = resumed.loader.next_step
    assert first == 6
    for step in [first, first + 1, first + 2, 2, 3, 7]:  # and jumps back and ahead restart the pipeline
        assert torch.equal(resumed.read_batch(step), plain.batch(step)), step
    resumed.close()


def test_prefetched_dali_feed_equals_prefetched_pytorch_feed(dali, tmp_path, store):
    cfg_torch = _config(tmp_path / "a", store)
    cfg_dali = _config(tmp_path / "b", store, "data.loader=dali")
    k = 4
    feeds = [build_prefetched_loader(c, 0, 1, CPU, consumed_samples=k * 8, last_step=10)
             for c in (cfg_torch, cfg_dali)]
    try:
        assert feeds[1].name.startswith("dali ")
        for step in range(k + 1, 11):
            a, b = (f.batch(step) for f in feeds)
            assert torch.equal(a, b), step
            assert feeds[0].state_dict() == feeds[1].state_dict() == {"consumed_samples": step * 8}
    finally:
        for f in feeds:
            f.close()


def _losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _train(cfg) -> dict:
    from nanotronix.parallel import ParallelContext
    from nanotronix.train.trainer import train

    return train(cfg, ParallelContext.build(cfg), CPU)


def test_trainer_with_dali_matches_pytorch_loader(dali, tmp_path, store):
    """The whole trainer (prefetching feed included) on both loaders. Resume through the trainer is not repeated
    here (a checkpoint save and load cost ~20 s): the resume state is the loader's, tested above and in
    tests/test_prefetch.py."""
    steps = 5
    _train(_config(tmp_path / "torch", store, f"train.train_steps={steps}"))
    _train(_config(tmp_path / "dali", store, "data.loader=dali", f"train.train_steps={steps}"))
    expected = _losses(tmp_path / "torch" / "logs")
    assert sorted(expected) == list(range(1, steps + 1))
    assert _losses(tmp_path / "dali" / "logs") == expected  # same batches in the same order: bit-identical losses


def test_dali_requested_but_not_installed_is_a_clear_error(monkeypatch, tmp_path, store):
    monkeypatch.setattr(accel, "dali_modules", lambda: None)
    cfg = _config(tmp_path, store, "data.loader=dali")
    with pytest.raises(UserError, match=r"data.loader: dali needs NVIDIA DALI, which is not installed "
                                        r"\(pip install nvidia-dali-cuda120"):
        build_prefetched_loader(cfg, 0, 1, CPU)


def test_dali_reads_no_skipped_step_and_raises_a_read_error_at_its_own_step(dali, tmp_path, store):
    """DALI's queue reads up to two steps ahead. A step in train.skip_steps is never read (the way past a damaged
    stretch of a store: before, DALI read it ahead and the run failed there anyway), and a read that fails is
    raised when its own step's batch is asked for, as with the PyTorch loader (before: out of a step two earlier,
    costing the good steps between)."""
    cfg = _config(tmp_path, store)
    bad_step = 5
    loaders = []
    for skipped in ([(bad_step, bad_step)], []):
        loader = build_train_loader(cfg, 0, 1)
        original = loader.read_samples
        read = []

        def read_samples(ids, out=None, original=original, read=read):
            step = int(ids[0]) // 8 + 1
            read.append(step)
            if step == bad_step:
                raise ValueError(f"damaged window in step {step}")
            return original(ids, out)

        loader.read_samples = read_samples
        loaders.append((loader, read))
    from nanotronix.data.dali_loader import DaliBatchReader

    plain = build_train_loader(cfg, 0, 1)
    reader = DaliBatchReader(loaders[0][0], CPU, last_step=8, skipped_steps=[(bad_step, bad_step)])
    for step in (1, 2, 3, 4, 6, 7, 8):
        assert torch.equal(reader.read_batch(step), plain.batch(step)), step
    assert bad_step not in loaders[0][1]
    reader.close()

    reader = DaliBatchReader(loaders[1][0], CPU, last_step=8)
    for step in range(1, bad_step):  # the failed read-ahead of step 5 does not surface at steps 3 or 4
        assert torch.equal(reader.read_batch(step), plain.batch(step)), step
    with pytest.raises(ValueError, match="damaged window in step 5"):
        reader.read_batch(bad_step)
    reader.close()
