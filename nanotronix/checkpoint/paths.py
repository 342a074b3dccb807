"""Where checkpoints live, how a step is committed, and which step a path means.

A run's checkpoint folder holds one folder per committed step and a `latest` pointer:

    CKPT_DIR/step_0000200/      complete: renamed into place only after every file in it was written and fsynced
    CKPT_DIR/step_0000400/
    CKPT_DIR/latest             "step_0000400\\n", replaced atomically after the rename (for people and scripts)
    CKPT_DIR/.step_0000600.tmp/ a save in progress (or one killed mid-way); never read, removed by the next save
    CKPT_DIR/.step_0000400.replaced/  an older copy of a step being saved again after a rollback, until the new
                                one is in place
    CKPT_DIR/.latest.tmp-PID    the pointer's next version, left by a kill before it replaced `latest`; removed by
                                the next save

The rename is the commit point: a run resumes from the newest step folder holding its manifest, so a crash at any
moment leaves every committed step intact and the newest of them the one resumed from, even a crash between the
rename and the pointer update, which leaves `latest` on the step before (a resume that trusted it would train a
whole interval again). `tools/rollback.py` therefore moves later steps out of the step pattern before it points
`latest` back. Pruning (`Retention`: the newest `keep_last`, plus milestones kept for good) runs only after a new
step is committed and never removes the newest step nor the one that `latest` names.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nanotronix.checkpoint.errors import CheckpointError
from nanotronix.data.files import fsync_folder_if_allowed, fsync_path

MANIFEST_NAME = "checkpoint.json"  # written last inside a step folder; its presence marks a complete step
LATEST_NAME = "latest"
LOCK_NAME = ".lock"  # the lock a run holds on its checkpoint.dir (Checkpointer._lock_run_dir)
# \Z, not $ (which also matches before a final line break): a folder named "step_0000500\n" is no step 500, which
# a resume would take and whose number would prune real steps
_STEP_RE = re.compile(r"^step_([0-9]+)\Z")
_TEMP_RE = re.compile(r"^\.step_([0-9]+)\.(tmp|replaced|pruning)\Z")
_POINTER_TEMP_RE = re.compile(rf"^\.{LATEST_NAME}\.tmp-[0-9]+\Z")  # write_text_durably's temp file of `latest`


def step_folder_name(step: int) -> str:
    return f"step_{step:07d}"


def temp_folder(run_dir: Path, step: int) -> Path:
    return run_dir / f".{step_folder_name(step)}.tmp"


def is_step_folder(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def step_of(path: Path) -> Optional[int]:
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else None


def committed_steps(run_dir: Path) -> list[Path]:
    """Complete step folders of a run, oldest first. Two folders of one step (a `step_4` copied in beside
    `step_0000004`) come in a fixed order, the name a save gives last, so the newest step is the same whatever order
    the file system lists them in."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if step_of(p) is not None and is_step_folder(p)]
    return sorted(found, key=lambda p: (step_of(p), p.name == step_folder_name(step_of(p)), p.name))


def read_latest(run_dir: Path) -> Optional[Path]:
    """The step folder that `latest` names, if the pointer exists and names a complete step."""
    pointer = run_dir / LATEST_NAME
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except UnicodeDecodeError:  # a damaged pointer: stale, like one naming no complete step
        return None
    # the name of one of the run's own step folders, or stale: a path out of the run (`../other/step_N`, absolute)
    # names another run's step
    if not _STEP_RE.match(name) or not is_step_folder(run_dir / name):
        return None
    return run_dir / name


def find_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """The step folder that a CKPT_DIR means, or None when it holds no complete checkpoint (or is one of a save's
    hidden `.step_N.*` folders).

    A step folder means itself; a run's checkpoint folder means its newest complete step, not necessarily the one
    `latest` names: a kill between a step's rename (its commit) and the pointer update leaves `latest` on the step
    before. A path may start with `~` (`--checkpoint=~/run` reaches the tools unexpanded).
    """
    path = Path(path).expanduser()
    if _TEMP_RE.match(path.name):
        # Never a checkpoint, even holding a manifest: a save killed before its commit rename (its files maybe not
        # all durable), an old copy being replaced, or a pruned step whose files are being deleted in any order.
        return None
    if is_step_folder(path):
        return path
    if not path.is_dir():
        return None
    steps = committed_steps(path)
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Like `find_checkpoint`, but a path without a complete checkpoint is an error naming it."""
    found = find_checkpoint(path)
    if found is not None:
        return found
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _TEMP_RE.match(path.name):
        raise CheckpointError(f"{path} is not a committed checkpoint (a save that never committed, or a step being "
                              "replaced or pruned): use its run folder or a step_NNNNNNN folder")
    if path.is_dir() and (step_of(path) is not None or any(path.glob("*.distcp"))):
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST_NAME} is missing "
                              "(the save was interrupted)")
    raise CheckpointError(f"no complete checkpoint in {path} (expected a step_NNNNNNN folder holding "
                          f"{MANIFEST_NAME}, or a run folder containing such folders)")


# --------------------------------------------------------------------------------------------------
# durable file-system operations


def write_text_durably(path: Path, text: str) -> None:
    """Replace `path` atomically: write a hidden temp file, fsync it, rename it, fsync the folder."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError:  # a full disk, or `path` a folder: the pointer stays as it was, and no temp file beside it
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def remove_stale_temps(run_dir: Path, keep: Optional[Path] = None) -> None:
    """Delete the temp folders of saves that never committed (killed mid-way), replaced step folders and pruned
    ones whose deletion was cut short, and a `latest` pointer's temp file that a kill kept from replacing it."""
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if (_TEMP_RE.match(p.name) and p != keep) or _POINTER_TEMP_RE.match(p.name):
            remove_entry(p)


def remove_entry(path: Path) -> None:
    """Delete a folder's tree, or a file or symlink (whatever a leftover name holds: a `.step_N.tmp` file would stop
    the save of step N, and rmtree leaves a symlink in place), never what a symlink points to (a step linked into
    the run from elsewhere); what cannot be deleted stays, for the next try."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def commit_step(temp: Path, run_dir: Path, step: int) -> Path:
    """Rename a fully written temp folder to its step folder, then point `latest` at it. The rename is the commit:
    a `latest` that cannot be replaced then (a folder in its place, a full disk) is a CheckpointError that says the
    step is saved, raised once the step is complete and the older copy it replaced is gone."""
    final = run_dir / step_folder_name(step)
    fsync_path(temp)
    replaced = None
    if final.exists():
        # A run resumed from an older step (a rollback, or a crash before `latest` moved) is redoing this one.
        # Move the old folder aside rather than deleting it first, so a complete copy exists at every moment.
        replaced = run_dir / f".{final.name}.replaced"
        remove_entry(replaced)
        os.rename(final, replaced)
    os.rename(temp, final)
    fsync_path(run_dir)
    fsync_folder_if_allowed(run_dir.parent)  # the run folder's own entry, should a user's `mkdir -p` have made it
    if replaced is not None:  # the new copy is durable: the old one is no longer needed, whatever `latest` does
        remove_entry(replaced)
    pointer = run_dir / LATEST_NAME
    try:
        write_text_durably(pointer, final.name + "\n")
    except OSError as e:
        raise CheckpointError(saved_but(final, f"{pointer} could not be replaced to name it ({e.strerror or e}): "
                                               "move what is there out of the way before the next save")) from None
    return final


def check_not_a_step_folder(run_dir: Path) -> None:
    """CheckpointError when a run's checkpoint.dir is itself a step folder (holds a manifest): the run would save its
    steps inside it, and every restart resume from that step again (a step folder means itself), so a requeued job
    went back to it each time. Said before the folder gets anything of the run's (its lock, `latest`, steps)."""
    if is_step_folder(run_dir):
        raise CheckpointError(f"checkpoint.dir {run_dir} is a step folder (it holds {MANIFEST_NAME}), not a run's "
                              f"folder: every restart would resume from it again; set checkpoint.dir to its run folder "
                              f"({run_dir.parent}), or start from it with checkpoint.resume={run_dir} and another "
                              "checkpoint.dir")


def check_pointer_replaceable(run_dir: Path) -> None:
    """CheckpointError unless `latest` can be replaced: a folder in its place (a copy gone wrong) fails every save
    after its commit, and a rollback; said before a run trains or a rollback moves anything."""
    pointer = run_dir / LATEST_NAME
    if pointer.is_dir() and not pointer.is_symlink():  # a link is replaced as a file is
        raise CheckpointError(f"{pointer} is a folder where the run's `latest` pointer file goes: move it out of the "
                              "way")


def saved_but(final: Path, failure: str) -> str:
    """What failed after a step's commit (its rename), said with what holds all the same: the step is saved."""
    return f"step {step_of(final)} is saved in {final} (committed: a resume takes it), but {failure}"


@dataclass(frozen=True)
class Retention:
    """Which committed steps pruning keeps: the newest `keep_last` (0: every step), and for good the multiples of
    `keep_every` (0: none) and the steps in `keep_steps` (checkpoint.keep_every / keep_steps: a WSD run's decays and
    later phases start from such milestones)."""
    keep_last: int = 0
    keep_every: int = 0
    keep_steps: frozenset = frozenset()

    @classmethod
    def of(cls, settings) -> "Retention":
        """From a CheckpointConfig."""
        return cls(settings.keep_last, settings.keep_every, frozenset(settings.keep_steps))

    def milestone(self, step: int) -> bool:
        return (self.keep_every > 0 and step % self.keep_every == 0) or step in self.keep_steps


def saved_retention(config: Any) -> Retention:
    """The milestones (checkpoint.keep_every / keep_steps) of the run that saved a step, from its manifest's `config`;
    none where it holds no such settings (saved before they existed) or none of their types (edited by hand)."""
    settings = config.get("checkpoint") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        return Retention()
    every, steps = settings.get("keep_every") or 0, settings.get("keep_steps") or []
    if type(every) is not int or every < 0 or not isinstance(steps, list) or any(type(s) is not int for s in steps):
        return Retention()
    return Retention(0, every, frozenset(steps))


def _saved_as_milestone(step_dir: Path) -> bool:
    """Whether the step is a milestone by the keep_every / keep_steps of the run that saved it (its manifest's
    config): a resume that leaves those settings out (a requeue with trimmed overrides) must not prune it."""
    try:
        manifest = json.loads((step_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError, RecursionError):  # unreadable: the current settings decide
        return False
    return saved_retention(manifest.get("config") if isinstance(manifest, dict) else None).milestone(step_of(step_dir))


def kept_for_good(step_dir: Path, retention: Retention) -> bool:
    """Whether pruning keeps the committed step for good: a milestone by `retention` (the current settings) or by the
    settings it was saved with."""
    return retention.milestone(step_of(step_dir)) or _saved_as_milestone(step_dir)


def prune(run_dir: Path, retention: Retention) -> list[Path]:
    """Remove the committed steps `retention` does not keep, nor the settings they were saved with; never the one
    `latest` names."""
    if retention.keep_last <= 0:
        return []
    latest = read_latest(run_dir)
    steps = committed_steps(run_dir)
    doomed = [p for p in steps[:-retention.keep_last] if p != latest and not kept_for_good(p, retention)]
    removing = []
    for p in doomed:
        # Renamed out of the step pattern first (atomic): a prune interrupted half-way (killed, or files a reader
        # holds open on NFS) leaves a `.step_N.pruning` folder, which the next save's remove_stale_temps finishes
        # off, never a step folder that looks complete but lacks files, nor one that stays on disk for good.
        doomed_temp = run_dir / f".{p.name}.pruning"
        remove_entry(doomed_temp)  # left by an earlier prune of this step cut short: the rename cannot replace it
        try:
            p.rename(doomed_temp)
        except OSError:  # cannot rename: at least no longer a complete step
            if p.is_symlink():  # a step linked from elsewhere: the link goes, never the linked step's manifest
                remove_entry(p)
                continue
            (p / MANIFEST_NAME).unlink(missing_ok=True)
            doomed_temp = p
        removing.append(doomed_temp)
    if removing:  # the renames reach the disk before the deletions: a power loss cannot bring back a step folder
        fsync_path(run_dir)  # whose files were deleted
    for folder in removing:
        remove_entry(folder)  # a symlinked step: the link, not the step it points to
    return doomed


def committed_step(run_dir: Path, step: int) -> Optional[Path]:
    """The committed folder of `step` in a run, however its number is padded (a step_4 copied in counts as
    committed), or None."""
    return next((p for p in committed_steps(run_dir) if step_of(p) == step), None)


def _cut_short_aside(run_dir: Path, target: Path) -> Optional[Path]:
    """The folder of a rollback to `target` that was cut short: empty (killed before its first move), or holding the
    step `latest` still names, moved out of the run (pointing `latest` at `target` is a rollback's last act). A
    finished one's folder is not it: a later rollback to the same step gets its own."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        named = (run_dir / LATEST_NAME).read_text().strip() if (run_dir / LATEST_NAME).is_file() else ""
        for folder in sorted(run_dir.glob(f"rolled_back_after_{target.name}-*"), reverse=True):  # newest first
            if folder.is_dir() and not folder.is_symlink() and (
                    not any(folder.iterdir())
                    or (_STEP_RE.match(named) and (folder / named).is_dir() and not (run_dir / named).exists())):
                return folder
    return None


def _new_aside(run_dir: Path, target: Path) -> Path:
    """A new folder for the steps a rollback to `target` moves aside, named for the time; a second rollback to the same
    step within that second (a script rolling back, training a step, rolling back again) gets `-2`, `-3`: sharing
    the first one's folder, its moves failed ("Directory not empty") on a step name the first one holds."""
    name = f"rolled_back_after_{target.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(1):
        aside = run_dir / (name if n == 1 else f"{name}-{n}")
        try:
            aside.mkdir()
            return aside
        except FileExistsError:
            continue


def roll_back(run_dir: Path, step: int) -> tuple[Optional[Path], list[Path]]:
    """Make the committed `step` the run's latest again (`tools/rollback.py`): every later step folder moves into
    RUN_DIR/rolled_back_after_step_NNNNNNN-TIME/ (kept, not deleted; no step pattern there, so no resume, prune or
    export sees it), newest first, then `latest` names `step`. Returns (that folder or None, the steps moved).
    A resume takes the newest complete step, so a crash part-way leaves what looks like a run that got less far
    (its newest steps aside, the others not yet), never `latest` on `step` beside later steps that a resume would
    take: run it again to finish (into the same folder)."""
    target = committed_step(run_dir, step)
    if target is None:
        steps = ", ".join(str(step_of(p)) for p in committed_steps(run_dir)) or "none"
        raise CheckpointError(f"{run_dir}: no complete checkpoint of step {step} (committed steps: {steps})")
    check_pointer_replaceable(run_dir)  # found before anything moves
    later = [p for p in committed_steps(run_dir) if step_of(p) > step]
    aside = None
    if later:
        aside = _cut_short_aside(run_dir, target)  # a rollback cut short and run again: it finishes where it began
        if aside is None:
            aside = _new_aside(run_dir, target)
        else:
            aside.mkdir(exist_ok=True)
        for p in reversed(later):
            os.rename(p, aside / p.name)
        fsync_path(run_dir)
    write_text_durably(run_dir / LATEST_NAME, target.name + "\n")
    return aside, later
