"""The run's folders, checked at start-up: `checkpoint.dir` and `logging.dir` exist and every rank can write to
them, and `checkpoint.dir` is one folder that every node sees.

Found here, a bad folder is one line before step 1; found at the first save, it would cost every step before it.
A `checkpoint.dir` on a node-local disk (/tmp, /scratch on many clusters) is the costly case: every rank writes its
shards into its own node's copy, rank 0 commits a step whose shards mostly lie on other machines, and no saved
step can be loaded. `logging.dir` need not be shared (rank 0 writes the metrics; a profiled rank its own traces).
"""
from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Optional

from nanotronix.checkpoint.storage import Collective
from nanotronix.cli import check_writable_folder
from nanotronix.config import Config
from nanotronix.data.files import remove_quietly
from nanotronix.errors import UserError

MARKER_PREFIX = ".nanotronix-shared-"
# How long a rank looks for rank 0's marker: network file systems may show another client's new file a little
# late (attribute caches), never minutes late.
MARKER_WAIT_SECONDS = 10.0


def create_run_folders(cfg: Config, coll: Collective, marker_wait: float = MARKER_WAIT_SECONDS) -> None:
    """Rank 0 creates the folders and leaves a marker file in checkpoint.dir; then every other rank writes a probe
    file to each folder and looks for the marker (collective). Raises one UserError on every rank, naming the
    first rank (and host) that failed."""
    folders = [(option, folder) for option, folder in (("checkpoint.dir", cfg.checkpoint.dir),
                                                       ("logging.dir", cfg.logging.dir)) if folder]
    checkpoints = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None

    def where() -> str:
        return f"rank {coll.rank}, {socket.gethostname()}"

    def check() -> Optional[str]:
        for option, folder in folders:
            try:
                check_writable_folder(folder, option)
            except UserError as e:
                return str(e) if coll.rank == 0 else f"{e} (on {where()})"
        return None

    def leave_marker() -> tuple[Optional[str], Optional[str]]:  # (error, the marker's name)
        error = check()  # makes the folders, their new levels durable before any step is committed in them
        if error is not None or checkpoints is None:
            return error, None
        name = f"{MARKER_PREFIX}{uuid.uuid4().hex}"
        try:
            (checkpoints / name).write_text(socket.gethostname())
        except OSError as e:
            return f"checkpoint.dir: cannot write to {checkpoints} ({e.strerror or e})", None
        return None, name

    def sees(name: Optional[str]) -> Optional[str]:
        error = check()
        if error is not None or name is None:
            return error
        deadline = time.monotonic() + marker_wait
        while not (checkpoints / name).exists():
            if time.monotonic() > deadline:
                return (f"checkpoint.dir {checkpoints} is not one folder shared by every node: {where()} does not "
                        f"see the file {name} that rank 0 wrote there; every rank saves its part of each "
                        "checkpoint into that folder, so it must be on a file system all nodes mount")
            time.sleep(0.2)
        return None

    error, name = coll.broadcast(leave_marker() if coll.rank == 0 else None)  # rank 0 creates them
    try:
        if error is None:  # then every other rank writes to them and looks for the marker
            error = next((e for e in coll.all_gather(sees(name) if coll.rank != 0 else None) if e), None)
    finally:
        if coll.rank == 0 and name is not None:
            remove_quietly(checkpoints / name)
    if error:
        raise UserError(error, every_rank=True)
