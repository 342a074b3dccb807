"""Launch preflight: check a run's config, layout, devices and data in seconds, before any rendezvous.

    python -m nanotronix.preflight --config CONFIG.yaml --nnodes N --nproc-per-node P [dotted.key=value ...]

The Slurm scripts run it once, on the first node, before `srun torchrun`. A missing config, a token store that
is not there, or a layout that does not fit the allocation then ends the job within seconds with one line
(`error: ...`, exit 2), instead of failing on every rank after the rendezvous (or hanging in it). On success it
prints one line that summarises the run, then the run's start notes (`note: ...`, one a line: settings that are
valid but likely not what was meant), which the trainer would otherwise say only when the job leaves the queue.
It reads the same config and overrides as the trainer, so it checks exactly what the trainer will run.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from nanotronix.cli import ArgumentParser, check_writable_folder, integer, one_line_errors, user_path
from nanotronix.config import Config, grad_accum_steps, load_config
from nanotronix.config_checks import resolve_layout, too_few_processes
from nanotronix.errors import UserError

if TYPE_CHECKING:
    from nanotronix.data import TokenStore
    from nanotronix.data.loader import TrainLoader


class PreflightError(UserError):
    """A launch problem found before any process started."""


def check_layout(cfg: Config, nnodes: int, nproc_per_node: int) -> int:
    """The world size must hold tp*pp and fit the config's layout; returns the data-parallel size."""
    world = nnodes * nproc_per_node
    short = too_few_processes(cfg.parallel, world)
    if short:
        raise PreflightError(f"{short} ({nnodes} node(s) x {nproc_per_node} per node)")
    return resolve_layout(cfg, world)


def check_devices(cfg: Config, nproc_per_node: int) -> str:
    """On CUDA, this node must show at least one GPU per process."""
    import torch

    if cfg.train.device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if cfg.train.device == "cuda":
            raise PreflightError("train.device: cuda, but no CUDA GPU is visible on this node "
                                 f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return "cpu"
    found = torch.cuda.device_count()
    if found < nproc_per_node:
        raise PreflightError(f"{nproc_per_node} processes per node need {nproc_per_node} GPUs, this node shows "
                             f"{found}")
    return torch.cuda.get_device_name(0)


def check_device_features(cfg: Config, world: int, on_cuda: bool) -> None:
    """What the trainer refuses once it knows its device and world size, before the first step: an attention
    backend this device or dtype cannot run (flex on CPU, flash-attn in fp32), a CUDA memory snapshot on CPU,
    a profiled rank the run does not have."""
    import torch

    from nanotronix import accel
    from nanotronix.train.profiler import StepProfiler

    device = torch.device("cuda" if on_cuda else "cpu")
    accel.resolve_attention(cfg.model.attn_implementation, device, cfg.train.dtype)
    StepProfiler.from_config(cfg, -1, world, device)  # rank -1: checks only, profiles nothing


def check_data(cfg: Config, dp: int) -> tuple[TrainLoader, dict[str, TokenStore]]:
    """Open every token store (the validation stores too) and build the sampler's schedule (reads only headers);
    returns the loader and every store by path."""
    from nanotronix.data import DataError, build_train_loader
    from nanotronix.data.loader import data_root_hint

    hint = data_root_hint(cfg, [ds.path for stage in cfg.data.stages for ds in stage.datasets] +
                          list(cfg.validation.data))
    try:
        loader = build_train_loader(cfg, 0, dp, consumed_samples=0)
        stores = dict(loader.stores)
        if cfg.validation.interval > 0:
            from nanotronix.train.validation import open_validation_store
            v = cfg.validation
            for path in v.data:
                stores[path] = open_validation_store(path, v.num_samples, cfg.train.seq_len, cfg.model.vocab_size)
    except DataError as e:
        raise PreflightError(f"{e}{hint}" if hint not in str(e) else str(e)) from None
    return loader, stores


def check_writable(path: str | None, what: str) -> None:
    """The run's folder can be created and written; it is not left created (the run makes it: a launch that fails
    before step 1 would leave empty folders that look like a run's)."""
    if path:
        try:
            check_writable_folder(os.path.expanduser(path), what, keep=False)
        except UserError as e:
            raise PreflightError(str(e)) from None


def check_metrics_file(cfg: Config) -> None:
    """logging.dir's metrics.jsonl is no folder (the run's own check, before its first step)."""
    from nanotronix.train.metrics import check_metrics_file as check_file

    if cfg.logging.dir:
        try:
            check_file(os.path.expanduser(cfg.logging.dir))
        except UserError as e:
            raise PreflightError(str(e)) from None


def check_loggers(cfg: Config) -> None:
    """The packages of the loggers the config asks for are installed (a W&B login is checked by the run itself)."""
    import importlib.util

    for wanted, key, package in ((cfg.logging.tensorboard, "logging.tensorboard", "tensorboard"),
                                 (cfg.logging.wandb_project is not None, "logging.wandb_project", "wandb")):
        if wanted and importlib.util.find_spec(package) is None:  # the run's own words for it (metrics.py)
            raise PreflightError(f"{key}: needs the {package} package (pip install {package})")


def check_resume(cfg: Config) -> tuple[int, dict]:
    """The checkpoint the run would start from is there, holds a model of the config's shape in the RoPE layout the
    model computes, every file it lists present at its recorded size (a truncated copy: cheap stats, no hashing),
    checkpoint.resume fits checkpoint.dir (none into a folder holding checkpoints, an earlier step of the run's own
    folder), and the run's global batch size and last step fit the step: the trainer's own decisions, made here
    before torchrun starts on every node. Returns the step the run would start after (0: from scratch) and the
    checkpoint's data stats (what the trainer carries its token counts and epochs on from)."""
    from pathlib import Path

    from nanotronix.checkpoint.checkpointer import check_architecture, check_resumed_position, choose_resume_source
    from nanotronix.checkpoint.manifest import check_rope_layout, check_sizes, read_manifest
    from nanotronix.model.rope import ROPE_LAYOUT

    run_dir = Path(cfg.checkpoint.dir).expanduser() if cfg.checkpoint.dir else None
    try:
        source = choose_resume_source(run_dir, cfg.checkpoint.resume, log=lambda _: None)
        if source is None:
            return 0, {}
        manifest = read_manifest(source)  # a model of another shape than the config's would fail after the rendezvous
        check_architecture(manifest["config"]["model"], cfg.to_dict()["model"], source)
        check_rope_layout(source, manifest, ROPE_LAYOUT)
        check_sizes(source, manifest)
        with_optimizer = bool(manifest.get("optimizer", False))  # weights only: the run starts at step 0
        step = int(manifest["step"]) if with_optimizer else 0
        check_resumed_position(source, step, int(manifest.get("consumed_samples", 0)) if with_optimizer else 0,
                               cfg.train)
        data = manifest.get("data")
        return step, (data if with_optimizer and isinstance(data, dict) else {})
    except UserError as e:
        raise PreflightError(f"checkpoint.resume: {e}" if "checkpoint.resume" not in str(e) else str(e)) from None


def preflight(config: str, overrides: list[str], nnodes: int, nproc_per_node: int) -> str:
    cfg = load_config(config, overrides)
    # the devices first: a GPU job on a node without GPUs (GPUS_PER_NODE left at 8 on a CPU cluster) gets 8 processes,
    # and the layout's error about them ("16 is not divisible by micro_batch_size*dp = 4*8") hid the cause
    device = check_devices(cfg, nproc_per_node)
    dp = check_layout(cfg, nnodes, nproc_per_node)
    check_device_features(cfg, nnodes * nproc_per_node, on_cuda=device != "cpu")
    loader, stores = check_data(cfg, dp)
    from nanotronix.data import document_eos_mismatch
    wrong_eos = document_eos_mismatch(stores, cfg.model.document_mask_eos_id)
    if wrong_eos:
        raise PreflightError(wrong_eos)
    check_writable(cfg.checkpoint.dir, "checkpoint.dir")
    check_writable(cfg.logging.dir, "logging.dir")
    check_metrics_file(cfg)
    resumed_step, resumed_data = check_resume(cfg)
    if resumed_data:  # the trainer's own carry: its epoch notes count the samples before the resume as it does
        loader.count_tokens_from(resumed_data, resumed_step)
    check_loggers(cfg)
    from nanotronix.train.start_notes import start_notes
    notes = start_notes(cfg, loader, stores, resumed_step)  # the trainer's, in its words
    p, t = cfg.parallel, cfg.train
    return (f"preflight ok: {nnodes} node(s) x {nproc_per_node} = {nnodes * nproc_per_node} processes on {device} | "
            f"tp={p.tp} pp={p.pp} dp={dp}, grad accumulation {grad_accum_steps(cfg, dp)} | {t.train_steps} steps of "
            f"{t.global_batch_size} x {t.seq_len} tokens | {len(cfg.data.stages)} stage(s), {len(stores)} token "
            f"store(s) found | " + (f"checkpoints {cfg.checkpoint.dir} (resume: {cfg.checkpoint.resume})"
                                     if cfg.checkpoint.dir else "no checkpoints (checkpoint.dir not set)")
            + "".join(f"\nnote: {note}" for note in notes))


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m nanotronix.preflight",
        description="Check a training launch (config, layout against the allocation, GPUs on this node, token "
                    "stores, output folders) before starting torchrun. Prints one summary line and the run's start "
                    "notes (one `note:` line each), or one error line and exits 2.")
    parser.add_argument("--config", type=user_path, required=True, help="YAML config file (as for nanotronix.train)")
    parser.add_argument("--nnodes", type=integer, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--nproc-per-node", type=integer, default=1, help="processes per node (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise PreflightError(f"--nnodes and --nproc-per-node must be >= 1, got {args.nnodes} and "
                             f"{args.nproc_per_node}")
    print(preflight(args.config, args.overrides, args.nnodes, args.nproc_per_node), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
