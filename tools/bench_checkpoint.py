"""What a checkpoint save costs the training: synchronous saves against asynchronous ones, measured in one run.

    python tools/bench_checkpoint.py --interval 5 --saves 4 --json bench_checkpoint.json
    python tools/bench_checkpoint.py --nproc 2 model.num_hidden_layers=4 --dir /scratch/bench   # 2 DP ranks
    python tools/bench_checkpoint.py model.preset=smollm2-1.7b train.seq_len=2048 --dir /scratch/bench   # on a GPU

Positional arguments are dotted config overrides (as for `python -m nanotronix.train`) on top of `--config` (default:
a ~30M-parameter model that trains on a CPU at about half a second a step; `model.preset=...` replaces it). The
same run is trained twice through the trainer itself (`nanotronix.train.trainer.train`: the real Checkpointer,
data loader and train step), saving every `--interval` steps, first with `checkpoint.async_save=false`, then
`true`, on a synthetic token store (the config's data and validation sections are replaced), checkpoints under
`--dir` (removed after each mode). Each rank trains one micro-batch per step unless the config or an override sets
train.global_batch_size.

A step's time is the wall time from the end of one step to the end of the next (data, train step, log and
checkpoint: what the training loop spends on it). Reported per mode:
  step         median time of the steps that neither save nor run beside a background write
  save step    median time of the steps that save: the step plus the training's pause for its save
  pause        median time a save held the training (sync: collect and write; async: collect and copy to host,
               after waiting for the previous write if it still runs: an --interval too short for the write)
  write        median duration of the background write (async), or of the write inside the pause (sync)
  beside write median time of the steps that ran while a background write was in flight (async: on a CPU the
               write competes with the training for the same cores, which a GPU node's training does not)
  cost/save    median over the saves of the extra time of the save step and the steps after it (until the next
               save) over as many plain steps: the whole price of a save, the slowed steps beside it included
and the bytes this rank collects per save (staged in host memory when async; each distinct chunk is collected by
one rank only, so about 1/N of the checkpoint on N ranks), the checkpoint's size on disk, whether the async saves
staged in pinned host memory (on CUDA they do; the first async save also allocates those buffers, which the later
ones reuse: the median pause over 3 or more saves leaves it out), and the ratios sync / async of the pause and of
the cost per save. The first `--warmup` steps and the last step (whose save always blocks: the run ends) are left
out. `--nproc N` runs N ranks (gloo on CPU, NCCL on CUDA: one GPU each) with data parallelism, started by
torch.multiprocessing; the step figures are rank 0's, the bytes every rank's.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)

import numpy as np
import torch

from nanotronix.checkpoint import Checkpointer, paths
from nanotronix.cli import ArgumentParser, check_writable_folder, integer, one_line_errors, user_path, write_json_report
from nanotronix.config import Config, config_from_dict
from nanotronix.config_tree import apply_override, read_yaml_tree
from nanotronix.data.files import remove_made_folders
from nanotronix.errors import UserError, fail

MODES = (("sync", False), ("async", True))

# ~30M parameters (a ~0.35 GB checkpoint with its AdamW moments): a save long enough to see next to a step of
# about a second on a 2-core CPU.
DEFAULT_MODEL = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 256,
                 "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "init_std": 0.02}
DEFAULT_TRAIN = {"seq_len": 128, "micro_batch_size": 2, "seed": 1}
STORE = "random"  # the synthetic store's name under the work folder


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)  # the summary above the options, the details below them
    ap = ArgumentParser(description=summary, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=details)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides (model.hidden_size=1024 ...)")
    ap.add_argument("--config", type=user_path, help="YAML config to start from (default: a small built-in model)")
    ap.add_argument("--interval", type=integer, default=5, help="steps between saves (default 5)")
    ap.add_argument("--saves", type=integer, default=4, help="timed saves per mode (default 4)")
    ap.add_argument("--warmup", type=integer, default=2, help="untimed steps first, fewer than --interval (default 2)")
    ap.add_argument("--nproc", type=integer, default=1, help="ranks, data parallel (default 1: this process)")
    ap.add_argument("--dir", type=user_path,
                    help="where the checkpoints are written (default: a temporary folder); use the file system a run "
                    "saves to")
    ap.add_argument("--json", type=user_path, help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    for name in ("interval", "saves", "nproc"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.interval < 2:
        ap.error("--interval must be >= 2 (a step between saves to compare with)")
    if not 0 <= args.warmup < args.interval:
        ap.error(f"--warmup must be >= 0 and less than --interval ({args.interval}): the first save comes after it")
    return args


# ------------------------------------------------------------------------------------------------------------
# the run: config, data, and the trainer with a Checkpointer that notes its times


def build_tree(args: argparse.Namespace, device_type: str) -> dict[str, Any]:
    """The config tree every mode shares (its checkpoint and logging folders, data and steps are set per run)."""
    tree = read_yaml_tree(args.config) if args.config else {"model": dict(DEFAULT_MODEL), "train": dict(DEFAULT_TRAIN)}
    if not args.config and any(o.startswith("model.preset=") for o in args.overrides):
        tree["model"] = {}  # the preset's shape, not the default model's fields (explicit fields win over a preset)
    tree.setdefault("train", {})["dtype"] = "bfloat16" if device_type == "cuda" else "float32"
    for o in args.overrides:
        apply_override(tree, o)
    t = tree["train"]
    t["train_steps"] = (args.saves + 1) * args.interval  # the last step's save (blocking: the run ends) is left out
    if "global_batch_size" not in t:  # one micro-batch per rank and step, unless the config says otherwise
        t["global_batch_size"] = int(t.get("micro_batch_size", 1)) * args.nproc
    return tree


def mode_config(tree: dict[str, Any], work: Path, mode: str, async_save: bool, interval: int) -> Config:
    tree = copy.deepcopy(tree)  # a copy per mode
    tree["data"] = {"root": str(work), "stages": [{"name": "bench", "start_step": 1,
                                                   "datasets": [{"path": STORE, "weight": 1.0}]}]}
    tree["validation"] = {}
    tree["checkpoint"] = {**tree.get("checkpoint", {}), "dir": str(work / mode / "checkpoints"), "interval": interval,
                          "async_save": async_save, "resume": "none", "keep_last": 2, "keep_every": 0,
                          "keep_steps": []}
    tree["logging"] = {"dir": str(work / mode / "logs"), "interval": 10**9, "tensorboard": False}
    return config_from_dict(tree)


def write_store(work: Path, cfg: Config) -> None:
    """Random tokens, documents of ~500, enough for every step without repeating (the sampler would cycle anyway)."""
    from nanotronix.data.megatron_store import MegatronWriter

    t = cfg.train
    tokens = max(t.train_steps * t.global_batch_size * (t.seq_len + 1) * 2, 100_000)
    rng = np.random.default_rng(0)
    vocab = min(cfg.model.vocab_size, 65535)
    writer = MegatronWriter(work / STORE, np.uint16)
    for _ in range(tokens // 500 + 1):
        writer.add_document(np.append(rng.integers(1, vocab, 499, dtype=np.uint16), 0))
    writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": vocab, "eos_id": 0}})


class TimedCheckpointer(Checkpointer):
    """The trainer's Checkpointer, noting when each step ends (`after_step` returns), how long a save held the
    training, and how long each write took and how many bytes its snapshot holds."""

    made: list["TimedCheckpointer"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_ends: dict[int, float] = {}
        self.pauses: dict[int, float] = {}
        self.writes: list[dict[str, Any]] = []
        TimedCheckpointer.made.append(self)

    def after_step(self, step: int, *args, **kwargs) -> bool:
        before = self.last_saved_step
        t0 = time.perf_counter()
        stop = super().after_step(step, *args, **kwargs)
        t1 = time.perf_counter()
        if self.last_saved_step == step != before:
            self.pauses[step] = t1 - t0
        self.step_ends[step] = t1
        return stop

    def _write(self, snapshot) -> None:
        nbytes = sum(p.tensor.numel() * p.tensor.element_size() for p in snapshot.pieces.values())
        pinned = all(p.tensor.is_pinned() for p in snapshot.pieces.values())
        t0 = time.perf_counter()
        super()._write(snapshot)
        self.writes.append({"step": snapshot.step, "start": t0, "end": time.perf_counter(), "bytes": nbytes,
                            "background": threading.current_thread() is not threading.main_thread(),
                            "pinned": pinned})


def train_timed(cfg: Config, device: torch.device) -> TimedCheckpointer:
    """One run through the trainer; its output kept back (the benchmark prints its own)."""
    from nanotronix.parallel import ParallelContext
    from nanotronix.train import trainer

    TimedCheckpointer.made.clear()
    with mock.patch.object(trainer, "Checkpointer", TimedCheckpointer), contextlib.redirect_stdout(io.StringIO()):
        trainer.train(cfg, ParallelContext.build(cfg), device)
    gc.collect()
    return TimedCheckpointer.made[-1]


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def summarize(ck: TimedCheckpointer, warmup: int, interval: int, last: int) -> dict[str, Any]:
    """The figures of one mode from its Checkpointer's notes (see the module docstring)."""
    background = [w for w in ck.writes if w["background"]]
    period = {s: ck.step_ends[s] - ck.step_ends[s - 1] for s in ck.step_ends if s - 1 in ck.step_ends
              and s > max(warmup, 1) and s != last}
    saves = sorted(s for s in ck.pauses if s != last)

    def beside_write(s: int) -> bool:
        return any(w["start"] < ck.step_ends[s] and w["end"] > ck.step_ends[s - 1] for w in background)

    plain = [dt for s, dt in period.items() if s not in ck.pauses and not beside_write(s)]
    beside = [dt for s, dt in period.items() if s not in ck.pauses and beside_write(s)]
    step = _median(plain)
    costs = []
    for s in saves:
        window = [period[x] for x in range(s, s + interval) if x in period]
        if step is not None and window:
            costs.append(sum(window) - len(window) * step)
    writes = [w for w in ck.writes if w["step"] != last]
    return {"step_s": step, "save_step_s": _median([period[s] for s in saves if s in period]),
            "pause_s": _median([ck.pauses[s] for s in saves]),
            "write_s": _median([w["end"] - w["start"] for w in writes]),
            "beside_write_s": _median(beside), "cost_per_save_s": _median(costs),
            "saves": len(saves), "plain_steps": len(plain), "steps_beside_write": len(beside),
            "collected_bytes": max((w["bytes"] for w in ck.writes), default=0),
            "staged_pinned": all(w["pinned"] for w in background) if background else None,
            "pauses_s": [ck.pauses[s] for s in saves], "writes_s": [w["end"] - w["start"] for w in writes]}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_modes(args: argparse.Namespace, tree: dict[str, Any], work: Path, device: torch.device,
              rank: int) -> dict[str, Any]:
    """Both modes on this rank: {mode: figures} (rank 0 also writes the synthetic store first)."""
    import torch.distributed as dist

    out = {}
    for mode, async_save in MODES:
        cfg = mode_config(tree, work, mode, async_save, args.interval)
        if rank == 0 and mode == MODES[0][0]:
            write_store(work, cfg)
        if dist.is_initialized():
            dist.barrier()  # the store is written before any rank reads it; the modes do not overlap
        ck = train_timed(cfg, device)
        out[mode] = summarize(ck, args.warmup, args.interval, cfg.train.train_steps)
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            run_dir = Path(cfg.checkpoint.dir)
            out[mode]["checkpoint_bytes"] = folder_bytes(paths.find_checkpoint(run_dir))
            shutil.rmtree(work / mode, ignore_errors=True)  # the next mode's disk is as empty as this one's was
    return out


def rank_main(rank: int, nproc: int, port: int, args: argparse.Namespace, work: str) -> None:
    """One of --nproc ranks (torch.multiprocessing): joins the group as under torchrun, writes its figures (or its
    error) to WORK/rank_R.json."""
    from nanotronix.distributed import init_distributed, pick_device

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result: dict[str, Any]
    try:
        device = pick_device("auto")
        if device.type == "cpu":  # N ranks share the cores instead of each starting a thread per core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
        init_distributed(device)
        result = run_modes(args, build_tree(args, device.type), Path(work), device, rank)
    except Exception as e:  # said by the parent, one line
        result = {"error": f"rank {rank}: {e}" if isinstance(e, UserError) else
                  f"rank {rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    (Path(work) / f"rank_{rank}.json").write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    try:
        mp.spawn(rank_main, args=(args.nproc, free_port(), args, str(work)), nprocs=args.nproc, join=True)
    except mp.ProcessExitedException as e:  # killed (out of memory?): no figures to read
        raise UserError(f"a rank died: {str(e).splitlines()[0]}") from None
    results = [json.loads((work / f"rank_{r}.json").read_text()) for r in range(args.nproc)]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise UserError(errors[0])
    return results


# ------------------------------------------------------------------------------------------------------------
# the report


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def format_table(modes: dict[str, dict[str, Any]]) -> str:
    def ms(v):
        return f"{v * 1000:,.0f} ms" if v is not None else "-"
    cols = [("step", "step_s"), ("save step", "save_step_s"), ("pause", "pause_s"), ("write", "write_s"),
            ("beside write", "beside_write_s"), ("cost/save", "cost_per_save_s")]
    lines = [f"{'mode':<6}" + "".join(f"{name:>14}" for name, _ in cols) + f"{'collected/rank':>16}"]
    for mode, r in modes.items():
        lines.append(f"{mode:<6}" + "".join(f"{ms(r[key]):>14}" for _, key in cols) +
                     f"{r['collected_bytes'] / 2**20:>12,.1f} MiB")
    return "\n".join(lines)


@one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda and args.nproc > torch.cuda.device_count():
        return fail(f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} GPU(s), one per rank")
    tree = build_tree(args, "cuda" if cuda else "cpu")
    made: list[Path] = []  # folders the checks below make: removed again, as the bench keeps nothing in --dir
    if args.json:  # an unusable --json path is said now, not after the runs
        if Path(args.json).is_dir():
            return fail(f"--json {args.json} is a folder; name the JSON file to write")
        made += check_writable_folder(Path(args.json).resolve().parent, "--json")
    if args.dir:
        made[:0] = check_writable_folder(args.dir, "--dir")  # first: it may lie in a folder made for --json
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    try:
        probe = mode_config(tree, work, "sync", False, args.interval)  # a bad config is one line before any run
        m, t = probe.model, probe.train
        device_name = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)"
        print(f"device: {device_name} x {args.nproc} rank(s) | torch {torch.__version__} | checkpoints in {work}")
        print(f"model: {m.num_parameters() / 1e6:.1f}M params | {t.dtype} | global batch {t.global_batch_size} x "
              f"{t.seq_len} | {t.train_steps} steps, a save every {args.interval} (timed: {args.saves}; warm-up "
              f"{args.warmup} steps and the last step left out)", flush=True)
        if args.nproc == 1:
            device = torch.device("cuda", 0) if cuda else torch.device("cpu")
            ranks = [run_modes(args, tree, work, device, 0)]
        else:
            ranks = run_ranks(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        remove_made_folders(made)  # a --json folder made for the report is made again when the report is written
    modes = ranks[0]
    for mode in modes:
        modes[mode]["collected_bytes_per_rank"] = [r[mode]["collected_bytes"] for r in ranks]
    sync, background = modes["sync"], modes["async"]
    pause_ratio = ratio(sync["pause_s"], background["pause_s"])
    cost_ratio = ratio(sync["cost_per_save_s"], background["cost_per_save_s"])
    table = format_table(modes)
    size = sync["checkpoint_bytes"]
    share = ", ".join(f"{b / size:.2f}" for b in modes["async"]["collected_bytes_per_rank"]) if size else "-"
    staged = {True: "pinned", False: "pageable", None: "-"}[background["staged_pinned"]]
    summary = (f"checkpoint: {size / 2**20:,.1f} MiB on disk; collected per rank and save: {share} of it; async "
               f"saves staged in {staged} host memory\n"
               f"pause sync / async: {f'{pause_ratio:.2f}x' if pause_ratio else '-'} | "
               f"cost per save sync / async: {f'{cost_ratio:.2f}x' if cost_ratio else '-'}")
    print(table, summary, sep="\n", flush=True)
    if args.json:
        write_json_report(args.json, {
            "device": device_name, "nproc": args.nproc, "torch": torch.__version__,
            "parameters": m.num_parameters(), "dtype": t.dtype, "seq_len": t.seq_len,
            "global_batch_size": t.global_batch_size, "interval": args.interval, "saves": args.saves,
            "warmup": args.warmup, "argv": sys.argv[1:] if argv is None else argv, "modes": modes,
            "pause_ratio": pause_ratio, "cost_ratio": cost_ratio, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
