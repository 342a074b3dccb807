#!/usr/bin/env python
"""Summarise a checkpoint (one step folder, or a run's checkpoint folder: its latest step), or verify it.

    python tools/inspect_checkpoint.py CKPT_DIR [--verify] [--json]

Prints what the step holds, from its manifest (checkpoint.json) and torch.distributed.checkpoint's own metadata:
the step and the data position, the model's shape and parameter count, whether the AdamW moments are there, the
layout that saved it, and for a run folder its committed steps and the milestones among them. --verify reads every
file and checks it against the size and SHA-256 the manifest recorded when the step was written (after copying
checkpoints between file systems, before a long job resumes from one); it exits non-zero with one line naming the
first damaged file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, one_line_errors, user_path
from nanotronix.errors import fail


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="tools/inspect_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=user_path, metavar="CKPT_DIR",
                   help="a step folder, or a run's checkpoint folder (latest step)")
    p.add_argument("--verify", action="store_true", help="check every file's size and SHA-256; non-zero exit on damage")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while verifying")
    return p.parse_args(argv)


def consumed_tokens(manifest: dict, consumed_samples: int, seq_len) -> int | None:
    """The tokens trained on: the datasets' counts the checkpoint saved (right across a resume that changed
    train.seq_len), else samples x the config's seq_len (checkpoints without them, an import: None)."""
    datasets = manifest.get("data", {}).get("datasets")
    if datasets and all("consumed_tokens" in d for d in datasets.values()):  # counts: read_manifest checked them
        return sum(d["consumed_tokens"] for d in datasets.values())
    return consumed_samples * seq_len if type(seq_len) is int and seq_len > 0 else None


def summarise(folder: Path) -> dict:
    from nanotronix.checkpoint import paths
    from nanotronix.checkpoint.manifest import read_manifest
    from nanotronix.checkpoint.state import MODEL_PREFIX
    from nanotronix.checkpoint.storage import dcp_metadata

    manifest = read_manifest(folder)
    tensors = dcp_metadata(folder).state_dict_metadata
    numel = {key: 1 for key in tensors}
    for key, meta in tensors.items():
        for n in getattr(meta, "size", ()):  # tensors only (DCP also stores plain values)
            numel[key] *= n
    config = manifest.get("config", {})
    train = config.get("train", {})
    consumed = int(manifest.get("consumed_samples", 0))
    run_steps = paths.committed_steps(folder.parent)
    retention = paths.saved_retention(config)  # the run's checkpoint.keep_every / keep_steps
    return {
        "path": str(folder), "step": manifest["step"], "consumed_samples": consumed,
        "consumed_tokens": consumed_tokens(manifest, consumed, train.get("seq_len")),
        "stage": manifest.get("data", {}).get("stage"),
        "model": {k: config.get("model", {}).get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "num_attention_heads", "num_key_value_heads",
                                                               "vocab_size", "tie_word_embeddings", "rope_theta")},
        "parameters": sum(n for key, n in numel.items() if key.startswith(MODEL_PREFIX)),
        "optimizer_state": bool(manifest.get("optimizer")), "optimizer_step": manifest.get("optimizer_step"),
        "layout": manifest.get("layout"), "rope_layout": manifest.get("rope_layout"),
        "torch_version": manifest.get("torch_version"), "source": manifest.get("source"),
        "trainer_state": sorted(manifest.get("trainer_state", {})),
        "files": len(manifest["files"]), "bytes": sum(f["size"] for f in manifest["files"].values()),
        "run_steps": [paths.step_of(p) for p in run_steps],
        # kept for good by the run's settings or those each step was saved with (a resume may have left them out)
        "milestones": [paths.step_of(p) for p in run_steps if paths.kept_for_good(p, retention)],
    }


def verify(folder: Path, progress: bool) -> None:
    from tqdm import tqdm

    from nanotronix.checkpoint.errors import CheckpointError
    from nanotronix.checkpoint.manifest import check_hashes, list_files, read_manifest
    from nanotronix.checkpoint.paths import MANIFEST_NAME

    manifest = read_manifest(folder)
    files = manifest["files"]
    # a file the manifest leaves out (its entry deleted by hand) has no size or hash to check: not "every file matches"
    unlisted = [name for name in list_files(folder) if name not in files]
    if unlisted:
        raise CheckpointError(f"checkpoint file missing from {MANIFEST_NAME}: {folder / unlisted[0]} (it cannot be "
                              "verified)")
    with tqdm(total=sum(f["size"] for f in files.values()), unit="B", unit_scale=True, desc="verify",
              disable=not progress) as bar:
        for name in sorted(files):
            check_hashes(folder, manifest, [name])
            bar.update(files[name]["size"])


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from nanotronix.checkpoint import paths
    from nanotronix.checkpoint.errors import CheckpointError
    from nanotronix.checkpoint.manifest import check_sizes, layout_text, read_manifest

    folder = None
    try:
        folder = paths.resolve_checkpoint(Path(args.checkpoint))
        check_sizes(folder, read_manifest(folder))  # a missing or truncated file: said at once, before hashing
        if args.verify:  # damage is the answer, before anything read from the damaged files
            verify(folder, progress=not (args.json or args.no_progress))
        report = summarise(folder)
        report["verified"] = args.verify
    except (CheckpointError, OSError) as e:
        from nanotronix.checkpoint.reader import still_there  # (torch: only on this path)
        try:
            if folder is not None:
                still_there(folder)  # a step pruned meanwhile by a running run: not "incomplete", not "missing"
        except CheckpointError as pruned:
            return fail(pruned)
        return fail(e)
    if args.json:
        print(json.dumps(report))
        return 0
    m = report["model"]
    rows = [
        ("checkpoint", report["path"]),
        ("step", report["step"]),
        ("consumed", f"{report['consumed_samples']:,} samples"
                     + (f", {report['consumed_tokens']:,} tokens" if report["consumed_tokens"] is not None else "")
                     + (f" (stage {report['stage']})" if report["stage"] else "")),
        ("model", f"{report['parameters'] / 1e6:.1f}M parameters: {m['num_hidden_layers']} layers, hidden "
                  f"{m['hidden_size']}, FFN {m['intermediate_size']}, {m['num_attention_heads']} heads / "
                  f"{m['num_key_value_heads']} KV, vocab {m['vocab_size']}, tied {m['tie_word_embeddings']}, "
                  f"RoPE theta {m['rope_theta']} ({report['rope_layout']})"),
        ("optimizer", f"AdamW moments, {report['optimizer_step']} updates" if report["optimizer_state"]
                      else "none (weights only)"),
        ("saved by", f"layout {layout_text(report['layout'])}, torch {report['torch_version']}"),
        ("files", f"{report['files']} files, {_size(report['bytes'])}"),
    ]
    if report["source"]:  # convert_from_hf's record; the text shows its folder (--json keeps the whole config)
        hf = report["source"].get("hf") if isinstance(report["source"], dict) else None
        rows.append(("imported from", f"{hf.get('path')} (Hugging Face)" if isinstance(hf, dict)
                     else str(report["source"])))
    if report["trainer_state"]:
        rows.append(("trainer state", ", ".join(report["trainer_state"])))
    steps = report["run_steps"]
    if steps:  # the first and last few of a long run's steps
        shown = ", ".join(map(str, steps)) if len(steps) <= 8 else (
            f"{', '.join(map(str, steps[:3]))} ... {', '.join(map(str, steps[-3:]))}")
        rows.append(("run steps", f"{len(steps)} committed: {shown}"))
    if report["milestones"]:
        rows.append(("milestones", f"{len(report['milestones'])} kept for good (checkpoint.keep_every / keep_steps): "
                                   + ", ".join(map(str, report["milestones"][:8]))
                                   + (" ..." if len(report["milestones"]) > 8 else "")))
    if args.verify:
        rows.append(("verify", "OK: every file matches its size and SHA-256"))
    for key, value in rows:
        print(f"{key:14s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
