"""Weights & Biases: rank 0's metrics records as one W&B run (`logging.wandb_project`), next to metrics.jsonl.

The W&B run id is kept in LOGGING_DIR/wandb/run_id, so a resumed or requeued job (same logging folder) continues the
same W&B run. Its charts are drawn against the record's own `step` (`define_metric`), not W&B's count of log calls:
steps a resume trains again (those after its checkpoint) appear again instead of being dropped as out of order.
Offline (`logging.wandb_mode: offline`, the usual choice on compute nodes without internet) writes the run under
LOGGING_DIR/wandb for `wandb sync` later. wandb is imported here only, when asked for.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from nanotronix.config import LoggingConfig
from nanotronix.errors import UserError


class WandbLog:
    def __init__(self, cfg: LoggingConfig, run_config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise UserError("logging.wandb_project: needs the wandb package (pip install wandb)") from None
        folder = Path(cfg.dir) / "wandb"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file of that name: mkdir's FileExistsError
            raise UserError(f"logging.wandb_project: cannot make {folder} ({e.strerror or e})") from None
        # before W&B starts: a damaged saved id is not W&B failing to start (whose line says to log in)
        saved_id = run_id(folder)
        try:
            self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                                  name=cfg.wandb_name or Path(cfg.dir).resolve().parent.name,
                                  id=saved_id, resume="allow", dir=str(cfg.dir), mode=cfg.wandb_mode,
                                  config=run_config)
        except Exception as e:  # no API key, no network, a bad entity: one line, before any step runs
            said = " ".join(str(e).split())
            raise UserError(f"logging.wandb_project: W&B did not start ({type(e).__name__}: {said}); log in "
                            "first (`wandb login`, or WANDB_API_KEY), or set logging.wandb_mode=offline and "
                            "`wandb sync` the run later") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, scalars: dict[str, float]) -> None:
        self.run.log(scalars)

    def close(self) -> None:
        self.run.finish()


def run_id(folder: Path) -> str:
    """This logging folder's W&B run id: the one saved in `folder/run_id`, else a new one, saved (atomically). A saved
    one that cannot be read (a folder, bytes that are not text) or is empty is a UserError naming it, said before W&B
    starts (W&B's own refusal of it reads as W&B failing to start, with a hint to log in); a new id in its place
    would start another W&B run where a resume means to continue this one."""
    path = folder / "run_id"
    if not os.path.lexists(path):
        new = uuid.uuid4().hex[:12]
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(new + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"logging.wandb_project: cannot write {path} ({e.strerror or e})") from None
        return new
    try:
        saved, why = path.read_text(encoding="utf-8").strip(), "empty"
    except (OSError, UnicodeDecodeError) as e:
        saved, why = "", getattr(e, "strerror", None) or "not text"
    if not saved:
        raise UserError(f"{path}: no W&B run id to continue ({why}): delete it to start a new W&B run in this "
                        "logging.dir, or write the run's id into it")
    return saved
