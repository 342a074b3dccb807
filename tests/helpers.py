"""Shared test fixtures' building blocks: tiny configs, tiny learnable token stores and a tiny tokenizer."""
from __future__ import annotations

import multiprocessing
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Test cases that need a GPU: skipped on the CPU machines, run by tools/gpu_checks.sh on the GPU machine.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (run by tools/gpu_checks.sh)")

# A traceback frame of one of nanotronix's own modules, for the tests that a worker said one line and no traceback. Not
# "nanotronix/" alone: a checkout cloned as nanotronix/ holds the .venv whose python torchrun's report names
# (`of binary: .../nanotronix/.venv/bin/python`) and whose torch its own traceback's frames lie in.
NANOTRONIX_FRAME = re.compile(r'File "[^"]*nanotronix/(?:[a-z_]+/)?[a-z_0-9]+\.py"')

TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "init_std": 0.02}

# The fields of a trained step's metrics.jsonl record (no validation, no skipped update): each one the README names
# (tests/test_readme_commands.py), the trainer writes them all and no others (tests/test_train_cli.py).
METRICS_FIELDS = {"step", "loss", "lr", "grad_norm", "consumed_tokens", "tokens_per_sec", "tokens_per_sec_per_gpu",
                  "model_tflops_per_gpu", "mfu", "stage", "datasets", "time", "data_wait_ms", "data_wait_rank",
                  "peak_memory_gb"}


def readme_bash_block(after: str) -> list[str]:
    """The commands of README's first ```bash block after the text AFTER, one per line: continuation lines joined,
    comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split(after, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        line = re.split(r"\s+# ", line, maxsplit=1)[0].rstrip()
        current += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return [c for c in commands if c]


def write_learnable_store(prefix: Path, num_docs: int = 200, vocab: int = 256, seed: int = 0,
                          tokenizer_sha256: str | None = None) -> Path:
    """Documents of short arithmetic progressions: easy to learn, so a working trainer's loss falls fast."""
    from nanotronix.data.megatron_store import MegatronWriter

    rng = np.random.default_rng(seed)
    writer = MegatronWriter(prefix, np.uint16)
    for _ in range(num_docs):
        start, stride, length = rng.integers(1, vocab), rng.integers(1, 5), rng.integers(20, 120)
        doc = (start + stride * np.arange(length)) % (vocab - 1) + 1
        writer.add_document(np.append(doc, 0))  # 0 = end of document
    writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": vocab, "eos_id": 0,
                                   **({"sha256": tokenizer_sha256} if tokenizer_sha256 else {})}})
    return prefix


def walk_documents(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document index and position of each token of IDS [B, S], by walking the tokens (the reference for
    nanotronix.model.documents: an EOS ends its document, the next token starts one at position 0)."""
    doc_ids, positions = torch.zeros_like(ids), torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        doc, pos = 0, 0
        for s in range(ids.shape[1]):
            doc_ids[b, s], positions[b, s] = doc, pos
            pos += 1
            if ids[b, s] == eos_id:
                doc, pos = doc + 1, 0
    return doc_ids, positions


# --- Megatron .bin/.idx written through both of the writer's entry points, and read by the spec alone -------------

# The spec's table of token dtypes (Megatron-Core `class DType`), little-endian.
SPEC_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def write_megatron(prefix, docs: list[np.ndarray], dtype, batching_seed: int = 0) -> None:
    """A Megatron store of `docs` written through both of the writer's entry points: single documents and flat
    batches of several."""
    from nanotronix.data.megatron_store import MegatronWriter

    writer = MegatronWriter(prefix, dtype)
    rng, i = np.random.default_rng(batching_seed), 0
    while i < len(docs):
        batch = docs[i:i + int(rng.integers(1, 4))]
        if len(batch) == 1 and rng.integers(2):
            writer.add_document(batch[0])
        else:
            writer.add_documents(np.concatenate(batch), np.array([len(d) for d in batch]))
        i += len(batch)
    writer.finalize()


def read_megatron_plainly(prefix) -> tuple[np.dtype, list[np.ndarray]]:
    """The spec's reader: header fields at their offsets, the three arrays after it, the file ending there, and
    every document's tokens from its pointer in the .bin."""
    idx = Path(f"{prefix}.idx").read_bytes()
    assert idx[0:9] == b"MMIDIDX\x00\x00"
    assert int.from_bytes(idx[9:17], "little") == 1
    dtype = np.dtype(SPEC_DTYPES[idx[17]])
    n = int.from_bytes(idx[18:26], "little")
    doc_count = int.from_bytes(idx[26:34], "little")
    assert len(idx) == 34 + 12 * n + 8 * doc_count  # no multimodal trailer, nothing after
    lengths = np.frombuffer(idx, "<i4", n, 34)
    pointers = np.frombuffer(idx, "<i8", n, 34 + 4 * n)
    doc_indices = np.frombuffer(idx, "<i8", doc_count, 34 + 12 * n)
    # one sequence per document; pointers are the running byte offsets
    assert doc_indices.tolist() == list(range(n + 1))
    assert pointers.tolist() == [sum(int(x) for x in lengths[:i]) * dtype.itemsize for i in range(n)]
    binary = Path(f"{prefix}.bin").read_bytes()
    assert len(binary) == int(lengths.sum()) * dtype.itemsize  # no header, no padding
    docs = [np.frombuffer(binary, dtype, int(lengths[i]), int(pointers[i])) for i in range(n)]
    return dtype, docs


# What the tiny tokenizer learns from, and text the data tests tokenize: prose, code, digits, accents, CJK, emoji.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Pack my box with five dozen liquor jugs! 0123456789",
    "Sphinx of black quartz, judge my vow; the five boxing wizards jump quickly.",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600 emoji and accents",
]


def train_tiny_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE with <|endoftext|> as id 0 (like SmolLM2), trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def tiny_config(tmp_path: Path, store: Path, **sections) -> Path:
    cfg = {
        "model": dict(TINY_MODEL),
        "train": {"seq_len": 32, "global_batch_size": 8, "micro_batch_size": 2, "train_steps": 20, "seed": 7},
        "optimizer": {"lr": 3e-3},
        "lr_schedule": {"warmup_steps": 2},
        # data.root + a relative path: the sample order is keyed by "arith", the same on every machine and tmp dir
        "data": {"root": str(store.parent),
                 "stages": [{"name": "arith", "start_step": 1, "datasets": [{"path": store.name, "weight": 1.0}]}]},
        "logging": {"dir": str(tmp_path / "logs"), "interval": 1},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_tool(name: str):
    """tools/NAME.py as a module, so a test calls its main() in this process (no interpreter start-up per call).
    tools/ goes on sys.path, as when the tool runs as a script: each imports tools/_project_python.py first."""
    import importlib.util

    if str(ROOT / "tools") not in sys.path:
        sys.path.append(str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import does: a dataclass in the tool looks its module up there
    spec.loader.exec_module(module)
    return module


def record_file_system_calls(monkeypatch) -> list[tuple[str, ...]]:
    """Each fsync ("fsync", the path its descriptor names), os.rename / os.replace ("rename" | "replace", src, dst)
    and shutil.rmtree ("rmtree", path) from now on, in order, paths as str; the calls still happen. A power loss
    cannot be staged in a test; what survives one depends on the order of these calls (POSIX), which this records."""
    import shutil

    events: list[tuple[str, ...]] = []
    real_fsync, real_rename, real_replace, real_rmtree = os.fsync, os.rename, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, **kwargs):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, **kwargs)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kwargs)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        return real_rmtree(path, *args, **kwargs)

    for module, name, recorder in ((os, "fsync", fsync), (os, "rename", rename), (os, "replace", replace),
                                   (shutil, "rmtree", rmtree)):
        monkeypatch.setattr(module, name, recorder)
    return events


def run(args: list[str], cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS`, its output captured; past TIMEOUT s it is asked to stop (SIGTERM) before it is killed, and
    TimeoutExpired raised: torchrun starts its workers in sessions of their own and stops them only on a signal it
    can catch, so a killed launcher would leave them running (tests/test_helpers_torchrun.py)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as timed_out:
            proc.terminate()
            try:
                timed_out.stdout, timed_out.stderr = proc.communicate(timeout=60)  # torchrun's own grace: 30 s
            except subprocess.TimeoutExpired:
                proc.kill()
                timed_out.stdout, timed_out.stderr = proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def two_gloo_ranks(script: str, tmp_path: Path, timeout: float) -> list[tuple[int, str]]:
    """SCRIPT (`python -c`, from tests/) as ranks 0 and 1 at once, each given its rank, TMP_PATH/run and a
    rendezvous file for its gloo group (the script joins it); each rank's exit code and output, both killed if
    still running after TIMEOUT s."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path / "run"),
                               str(tmp_path / "rendezvous")], cwd=ROOT / "tests", env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [proc.communicate(timeout=timeout)[0] for proc in ranks]
    finally:
        for proc in ranks:
            proc.kill()
    return [(proc.returncode, out) for proc, out in zip(ranks, outs)]


# What the ranks of `start_gloo_ranks` import: a forkserver imports them once and forks each rank from itself. Spawned
# ranks imported them each (~4 s of CPU per rank: most of an 8-rank test's cost on 2 cores).
RANK_PRELOAD = ["torch", "torch.distributed.checkpoint", "nanotronix.train.trainer", "nanotronix.checkpoint.hf_export",
                "transformers", "checkpoint_helpers"]


def start_gloo_ranks(worker, nprocs: int, *args) -> None:
    """WORKER(rank, port, *ARGS) in NPROCS processes, which join a gloo group on 127.0.0.1:port (MASTER_ADDR/PORT);
    a rank that raises fails this with its traceback. The forkserver (one per test process, started by its first
    call) holds RANK_PRELOAD: a rank imports only its worker's module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multiprocessing.get_context("forkserver").set_forkserver_preload(RANK_PRELOAD)
    torch.multiprocessing.start_processes(worker, args=(port, *args), nprocs=nprocs, join=True,
                                          start_method="forkserver")


def torchrun(nproc: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return run(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args],
               timeout=timeout)
