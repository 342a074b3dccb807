"""The `note:` lines a run says at its start: settings that are valid but likely not what was meant.

One list for the trainer and the launch preflight (`python -m nanotronix.preflight`), so a user who submits a
three-day job reads them when submitting, not hours later when the job leaves the queue, in the trainer's words.
"""
from __future__ import annotations

from typing import Optional

from nanotronix.config import Config, config_notes
from nanotronix.data import TokenStore, multimodal_note, tokenizer_note
from nanotronix.data.loader import TrainLoader
from nanotronix.train.lr_schedule import schedule_note
from nanotronix.train.metrics import earlier_records_note


def start_notes(cfg: Config, loader: TrainLoader, stores: dict[str, TokenStore],
                resumed_step: Optional[int]) -> list[str]:
    """The run's start notes, in the order it says them. `stores`: the training stores and the validation ones;
    `resumed_step`: the step the run starts after (0: from scratch), or None to skip the logging.dir check (ranks
    other than 0, which print nothing: one look at a shared file system, not one per rank). Cheap: the sampler's
    arithmetic over the store headers already read, and one stat of metrics.jsonl."""
    steps = cfg.train.train_steps
    notes = [f"data: {name} is read {epochs:.2f} times over by step {steps} (the run takes more windows from it "
             "than its store holds; each epoch in a new order)"
             for name, epochs in loader.epochs(steps).items() if epochs > 1]
    notes += [*config_notes(cfg), tokenizer_note(stores, cfg.data.tokenizer), multimodal_note(stores),
              schedule_note(cfg.lr_schedule, steps),
              earlier_records_note(cfg, resumed_step) if resumed_step is not None else None]
    return [note for note in notes if note]
