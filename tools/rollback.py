#!/usr/bin/env python
"""Roll a run's checkpoint folder back to an earlier step (after a loss spike), so that the run resumes there.

    python tools/rollback.py CKPT_DIR --to-step N

`latest` then names step N, and every later step moves into CKPT_DIR/rolled_back_after_step_NNNNNNN-TIME/ (kept:
delete it once it is not wanted). Run it while the run is stopped (a run that holds the folder is refused). Then
start the run as before (checkpoint.resume: auto, the Slurm scripts' default), usually with the steps after N that
met the spike skipped:

    python tools/rollback.py runs/smollm2-1.7b/checkpoints --to-step 12000
    OVERRIDES="train.skip_steps=[12001-12200]" sbatch slurm/smollm2_1p7b.sh
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, integer, one_line_errors, user_path
from nanotronix.errors import fail


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="tools/rollback.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_dir", type=user_path, metavar="CKPT_DIR",
                   help="the run's checkpoint folder (checkpoint.dir)")
    p.add_argument("--to-step", type=integer, required=True, metavar="N", help="the committed step to go back to")
    return p.parse_args(argv)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from nanotronix.checkpoint import paths, run_lock
    from nanotronix.checkpoint.manifest import check_sizes, read_manifest

    run_dir = Path(args.checkpoint_dir)
    if not run_dir.is_dir() or paths.is_step_folder(run_dir):
        return fail(f"{run_dir}: not a run's checkpoint folder (the folder that holds step_NNNNNNN folders)")
    if not paths.committed_steps(run_dir):  # checked before the lock: its .lock file would stay in any folder
        return fail(f"{run_dir}: no committed step_NNNNNNN folder in it: nothing to roll back to")
    # A live run's next save would undo the rollback: refused while a run holds the folder, held meanwhile
    lock = run_lock.acquire(run_dir, 0.0, print, "stop it first (its next save would undo the rollback)",
                            name="CKPT_DIR")
    try:
        target = paths.committed_step(run_dir, args.to_step)  # the folder roll_back goes back to, of any padding
        if target is not None:  # a damaged step is no place to go back to: found before anything moves
            check_sizes(target, read_manifest(target))
        aside, moved = paths.roll_back(run_dir, args.to_step)
    finally:
        if lock is not None:
            os.close(lock)
    where = (f"; {len(moved)} later step(s) ({', '.join(str(paths.step_of(p)) for p in moved)}) moved to {aside} "
             f"(delete it when no longer wanted)") if moved else "; no later steps"
    print(f"rolled back {run_dir} to step {args.to_step}: latest -> {target.name}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
