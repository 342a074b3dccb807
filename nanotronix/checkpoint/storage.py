"""Writing and reading one step folder with torch.distributed.checkpoint (DCP), collectively over a group.

write_step: every rank writes its (deduplicated) pieces and its RNG file into `.step_N.tmp/`, hashes the files
it wrote, and sends the hashes to rank 0, which writes `checkpoint.json`, renames the folder into place, moves
`latest` and prunes. Nothing outside the temp folder changes before the rename, so a crash at any moment leaves
the previous checkpoint intact.

read_step: every rank checks the manifest and the sizes of all files, the ranks share the work of hashing the
files the load will read, and only then DCP reads each rank's pieces into its targets (in place).
"""
from __future__ import annotations

import contextlib
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: `except Exception` misses it

from nanotronix.checkpoint import manifest as mf
from nanotronix.checkpoint import paths
from nanotronix.checkpoint.errors import CheckpointError, unreadable
from nanotronix.data.files import make_folder_durably
from nanotronix.distributed import ranks_text

DCP_METADATA = ".metadata"


class Collective:
    """The group a save or load runs over; a plain process (no torch.distributed) is a group of one."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, single_process: bool = False):
        self.distributed = dist.is_initialized() and not single_process
        self.group = group
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.size = dist.get_world_size(group) if self.distributed else 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        return box[0]

    def save(self, state: dict[str, Any], folder: Path, planner=None) -> None:
        with self._quiet():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True), planner=planner,
                     **self._kwargs())

    def load(self, state: dict[str, Any], folder: Path) -> None:
        try:
            with self._quiet():
                dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), **self._kwargs())
        except CheckpointException as e:  # raised alike on every rank, with each failed rank's exception
            _raise_stop(e)
            raise CheckpointError(f"cannot read checkpoint {folder} ({_failure(e, self.rank)})",
                                  every_rank=True) from None

    def _quiet(self):
        return contextlib.nullcontext() if self.distributed else _quiet_single_process()

    def _kwargs(self) -> dict[str, Any]:
        return {"process_group": self.group} if self.distributed else {"no_dist": True}


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process call that it "assumes" one: here that is the intent, not a guess."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def write_step(run_dir: Path, step: int, state: dict[str, Any], manifest: dict[str, Any],
               rng_state: dict[str, Any], global_rank: int, coll: Collective, retention: paths.Retention) -> Path:
    """Save `state` (a DCP state dict) as step `step` of `run_dir`; every rank of `coll` calls this."""
    from nanotronix.checkpoint.rng import save_rng

    temp = paths.temp_folder(run_dir, step)
    error = None
    if coll.rank == 0:
        try:
            make_folder_durably(run_dir)
            paths.remove_stale_temps(run_dir)
            temp.mkdir()
        except OSError as e:
            error = f"cannot create checkpoint folder {temp}: {e}"
    error = coll.broadcast(error)
    if error:
        raise CheckpointError(error, every_rank=True)

    try:
        coll.save(state, temp)  # DCP raises the same CheckpointException, of every rank's failures, on every rank
        written = [save_rng(temp, global_rank, rng_state)]
    except (Exception, CheckpointException) as e:
        _raise_stop(e)  # alike on every rank (DCP hands every rank the same CheckpointException)
        error = _failure(e, coll.rank)
    failed = [e for e in coll.all_gather(error) if e]
    if failed:
        raise CheckpointError(f"cannot write checkpoint {temp} ({failed[0]}; {_free_space(run_dir)} free on its "
                              f"filesystem); the checkpoints committed before it are intact (the next save removes "
                              f"the partial folder)", every_rank=True)
    # Each rank reads back (hashes) what it wrote; a failure there is said to every rank, which would otherwise wait
    # in the gather below for the failing one until the collective timeout.
    try:
        written += [name for name in mf.list_files(temp) if name.startswith(f"__{coll.rank}_")]
        digest: Any = mf.digest_files(temp, written)
    except OSError as e:
        digest = f"on rank {coll.rank}: {type(e).__name__}: {e}"
    digests = coll.all_gather(digest)
    failed = [d for d in digests if isinstance(d, str)]
    if failed:
        raise CheckpointError(f"cannot read back checkpoint {temp} to checksum it ({failed[0]}); the checkpoints "
                              f"committed before it are intact (the next save removes the partial folder)",
                              every_rank=True)
    if coll.rank == 0:
        final = None
        try:
            files: dict[str, Any] = {}
            for d in digests:
                files.update(d)
            unclaimed = [name for name in mf.list_files(temp) if name not in files]  # .metadata, any others
            files.update(mf.digest_files(temp, unclaimed))
            mf.write_manifest(temp, {**manifest, "files": dict(sorted(files.items())), "saved_at": time.time()})
            final = paths.commit_step(temp, run_dir, step)
            paths.prune(run_dir, retention)
        except CheckpointError as e:  # committed, but `latest` not replaced (commit_step says so)
            error = str(e)
        except OSError as e:
            error = f"cannot commit checkpoint {temp}: {e}" if final is None else \
                paths.saved_but(final, f"pruning the older steps failed ({e})")
    # Also a barrier: nobody returns (and maybe exits) before the commit is durable.
    error = coll.broadcast(error)
    if error:
        raise CheckpointError(error, every_rank=True)
    return run_dir / paths.step_folder_name(step)


def _failure(error: BaseException, rank: int) -> str:
    """A failed write on `rank` in one line: the lowest rank's OSError, which names the cause (no space, no
    permission), else the lowest rank's error (torch's zip writer may only say "unexpected pos" when the disk fills
    under it), without torch's wrapper and tracebacks."""
    unwrapped = failures_of(error) or [(rank, error)]
    rank, error = next(((r, e) for r, e in unwrapped if isinstance(e, OSError)), unwrapped[0])
    return f"on rank {rank}: {type(error).__name__}: {' '.join(str(error).split())}"


def failures_of(error: BaseException) -> list[tuple[int, BaseException]]:
    """The exceptions behind DCP's CheckpointException, by rank (its `failures`: rank in the group -> (exception,
    traceback)), lowest rank first; [] for any other exception."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return []
    return sorted(((r, w[0] if isinstance(w, tuple) else w) for r, w in failures.items()), key=lambda rw: rw[0])


def _raise_stop(error: BaseException) -> None:
    """Raise as itself what stopped the process during a DCP load or save rather than failed it (Ctrl-C, a command's
    SIGTERM raised as cli.Terminated, a sys.exit): the caller's own handling of it (the trainer's "interrupted" line,
    a command's "terminated" and exit 143) then applies, not a one-line "cannot read/write checkpoint ... (on rank 0:
    KeyboardInterrupt: )" with the exit code of bad input. Nothing for any other failure."""
    stop = next((e for _, e in failures_of(error) if not isinstance(e, Exception)), None)
    if stop is not None:
        raise stop from None


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    return f"{free / 1e9:.1f} GB" if free >= 1e9 else f"{free / 1e6:.1f} MB"


def dcp_metadata(folder: Path):
    try:
        return dcp.FileSystemReader(str(folder)).read_metadata()
    except OSError as e:  # the disk or the permissions failed, not the file's content: say which, not "damaged"
        raise unreadable(folder / DCP_METADATA, e) from None
    except Exception as e:  # content that does not unpickle; the size/hash checks normally catch damage first
        raise CheckpointError(f"checkpoint file damaged: {folder / DCP_METADATA} cannot be read "
                              f"({type(e).__name__})") from None


def files_holding(metadata, keys: set[str]) -> set[str]:
    """The data files DCP will read for `keys` (all data files if the storage layout is not the known one)."""
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        return set()
    return {info.relative_path for index, info in storage.items() if index.fqn in keys}


def verify_step(folder: Path, manifest: dict[str, Any], metadata, keys: set[str], extra_files: list[str],
                coll: Collective) -> None:
    """SHA-256 of the files this load reads (by DCP's `metadata` of the step), the hashing split over the ranks; the
    caller checked every file's size (`manifest.check_sizes`, cheap), agreeing with the other ranks on the outcome."""
    needed = files_holding(metadata, keys) | set(extra_files) | {DCP_METADATA}
    if needed == set(extra_files) | {DCP_METADATA}:
        needed = set(manifest["files"])  # unknown storage layout: check everything
    everyone = sorted(set().union(*coll.all_gather(sorted(needed))))
    unlisted = [name for name in everyone if name not in manifest["files"]]
    mine = [name for i, name in enumerate(everyone) if i % coll.size == coll.rank and name in manifest["files"]]
    error = f"checkpoint file missing from {paths.MANIFEST_NAME}: {folder / unlisted[0]}" if unlisted else None
    if error is None:
        try:
            mf.check_hashes(folder, manifest, mine)
        except CheckpointError as e:
            error = str(e)
    # Each failed rank's error with its host, in the one gather every rank reaches: rank 0 says the lowest failed
    # rank's. Where only some ranks failed (a file is hashed by one rank; a node's own disk or memory), the line
    # names which ranks and hosts met it; where every rank did (a file missing from the manifest), it stands for all.
    met = {r: said for r, said in enumerate(coll.all_gather(error and (error, socket.gethostname()))) if said}
    if met:
        first = met[min(met)][0]
        if len(met) < coll.size:
            first += f" (met by {ranks_text(sorted(met), {r: host for r, (_, host) in met.items()})})"
        raise CheckpointError(first, every_rank=True)


def read_step(folder: Path, state: dict[str, Any], coll: Collective) -> None:
    """Fill `state` (a DCP state dict of targets) from the step folder."""
    coll.load(state, folder)
