"""The world of tests/test_resume_config_properties.py: the tiny run's stores (each of its own token range, so that a
window names the store it was cut from), its two stages and learning rate settings, and the config edits drawn
between the save and the resume (`edits`: stages, store spellings, renames and moves, rewritten stores, train, data
seed, validation, learning rate and model fields)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
from hypothesis import event
from hypothesis import strategies as st

from helpers import TINY_MODEL

RESUMED = 3  # the step resumed from
BASE_STEPS, GBS, SEQ, SEED = 6, 8, 32, 1234
MODEL = dict(TINY_MODEL, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
# Each store's token range (ids 0 = end of document aside): a window's tokens name the store it was cut from.
TOKENS = {"web": (1, 80), "code": (80, 160), "math": (160, 240), "extra": (240, 256)}
ZARR = {"extra"}  # a folder store (a trailing slash and `.zarr` spell it too), read only where an edit adds it
BASE_READ = ("web", "code", "math")  # the stores of the checkpoint's config (extra: never in it)


@dataclass(frozen=True)
class Dataset:
    store: str
    weight: Fraction  # as typed (written as its exact decimal)


@dataclass(frozen=True)
class Stage:
    name: str
    start: int
    datasets: tuple[Dataset, ...]


BASE_STAGES = (Stage("one", 1, (Dataset("web", Fraction(5, 10)), Dataset("code", Fraction(3, 10)),
                                Dataset("math", Fraction(2, 10)))),
               Stage("two", 5, (Dataset("code", Fraction(1, 2)), Dataset("math", Fraction(1, 2)))))
BASE_LR = {"optimizer.lr": 3e-3, "lr_schedule.warmup_steps": 2, "lr_schedule.decay_start_step": None,
           "lr_schedule.decay_steps": 0, "lr_schedule.decay_style": "linear", "lr_schedule.min_lr": 0.0}


# --- the stores ---------------------------------------------------------------------------------------------------

def documents(store: str, extra_docs: int = 0) -> list[np.ndarray]:
    """The store's documents: random tokens of its range, each ended by 0; `extra_docs` more at the end (grown)."""
    rng = np.random.default_rng(sorted(TOKENS).index(store))
    lo, hi = TOKENS[store]
    return [np.append(rng.integers(lo, hi, rng.integers(20, 120)), 0).astype(np.uint16)
            for _ in range(100 + extra_docs)]


def write_store(folder: Path, store: str, name: str, docs: list[np.ndarray]) -> None:
    from nanotronix.data.megatron_store import MegatronWriter
    from nanotronix.data.zarr_store import ZarrWriter

    sidecar = {"tokenizer": {"name": "synthetic", "vocab_size": 256, "eos_id": 0}}
    if store in ZARR:
        writer = ZarrWriter(str(folder / f"{name}.zarr"), np.uint16)
        writer.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    else:
        writer = MegatronWriter(folder / name, np.uint16)
        for doc in docs:
            writer.add_document(doc)
    writer.finalize(sidecar)


def stream(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(docs).astype(np.int64)


# --- the edits ----------------------------------------------------------------------------------------------------

@dataclass
class Edits:
    stages: tuple[Stage, ...] = BASE_STAGES
    first_start: int = 1  # 0 is step 1 too
    # store -> "as is" | "./" | ".//" | "../" | "suffix" (.bin, .zarr) | "idx" | "slash" (zarr) | "absolute"
    spelling: dict = field(default_factory=dict)
    renamed: dict = field(default_factory=dict)  # store -> "renamed" (another name under data.root) | "outside"
    moved: bool = False  # the corpus copied elsewhere, data.root following it
    root_spelling: str | None = ""  # "", "/", "/." appended to data.root; None: no data.root, absolute paths
    rewritten: dict = field(default_factory=dict)  # store -> "grown" | "reordered"
    train: dict = field(default_factory=dict)
    data_seed: int = SEED
    validation: dict | None = None
    lr: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    def value(self, key: str, default):
        return self.train.get(key, default)


WEIGHT_SCALES = [Fraction(1, 10), Fraction(1), Fraction(10), Fraction(1, 20), Fraction(2), Fraction(1, 4)]


def reweighted(stage: Stage, draw) -> Stage:
    """The stage's weights rescaled (their ratios kept, typed in other units) or one of them changed."""
    how = draw(st.sampled_from(["rescaled", "changed"]))
    base = [d.weight / min(x.weight for x in stage.datasets) for d in stage.datasets]  # 5:3:2 as small numbers
    scale = draw(st.sampled_from(WEIGHT_SCALES))
    weights = [w * scale for w in base]
    if how == "changed":
        i = draw(st.integers(0, len(weights) - 1))
        weights[i] = weights[i] * draw(st.sampled_from([Fraction(1, 2), Fraction(3, 2), Fraction(2), Fraction(5)]))
    event(f"weights {how}")
    return replace(stage, datasets=tuple(replace(d, weight=w) for d, w in zip(stage.datasets, weights)))


def reshaped(stage: Stage, draw) -> Stage:
    """The stage's datasets with one added, one removed or their order changed."""
    datasets = list(stage.datasets)
    how = draw(st.sampled_from(["added", "removed", "reordered"]))
    if how == "added":
        new = draw(st.sampled_from([s for s in TOKENS if s not in {d.store for d in datasets}]))
        datasets.insert(draw(st.integers(0, len(datasets))), Dataset(new, draw(st.sampled_from(
            [Fraction(1, 10), Fraction(1, 2), Fraction(3)]))))
    elif how == "removed" and len(datasets) > 1:
        datasets.pop(draw(st.integers(0, len(datasets) - 1)))
    else:
        how = "reordered"
        order = draw(st.permutations(range(len(datasets))))
        datasets = [datasets[i] for i in order]
    event(f"datasets {how}")
    return replace(stage, datasets=tuple(datasets))


def a_stage(draw, name: str, start: int) -> Stage:
    stores = draw(st.lists(st.sampled_from(sorted(TOKENS)), min_size=1, max_size=3, unique=True))
    return Stage(name, start, tuple(Dataset(s, Fraction(draw(st.integers(1, 5)), 10)) for s in stores))


def sometimes(draw, one_in: int) -> bool:
    """True about once in `one_in` draws: a middle value (hypothesis draws the ends of a range more often)."""
    return draw(st.integers(0, one_in - 1)) == one_in // 2


@st.composite
def edits(draw) -> Edits:
    e = Edits()
    one, two = BASE_STAGES
    if sometimes(draw, 3):
        one = reweighted(one, draw)
    if sometimes(draw, 5):
        one = reshaped(one, draw)
    if sometimes(draw, 4):
        two = reweighted(two, draw) if draw(st.booleans()) else reshaped(two, draw)
    if sometimes(draw, 5):
        two = replace(two, start=draw(st.sampled_from([2, 3, 4, 6])))
        event(f"stage two moved to {two.start}")
    if sometimes(draw, 6):
        one, two = replace(one, name="first"), replace(two, name="second")
        event("stages renamed")
    stages = [one, two]
    if sometimes(draw, 3):  # after the resumed step (appended) or before it (inserted)
        start = draw(st.sampled_from([k for k in (2, 3, 4, 6, 7) if k != two.start]))
        stages.append(a_stage(draw, "three", start))
        event("stage appended after the resumed step" if start > RESUMED else "stage inserted before it")
    e.stages = tuple(sorted(stages, key=lambda s: s.start))
    e.first_start = 0 if sometimes(draw, 6) else 1
    for store in TOKENS:
        e.spelling[store] = draw(st.sampled_from(["as is", "./", ".//", "../", "suffix", "absolute"] +
                                                 (["slash"] if store in ZARR else ["idx"])))
        if sometimes(draw, 20):
            e.renamed[store] = draw(st.sampled_from(["renamed", "outside"]))
            event(f"a store {e.renamed[store]}")
        if sometimes(draw, 16):
            e.rewritten[store] = draw(st.sampled_from(["grown", "reordered"]))
            event(f"a store {e.rewritten[store]}")
    e.moved = bool(e.renamed or e.rewritten) or sometimes(draw, 4)
    e.root_spelling = None if sometimes(draw, 12) else draw(st.sampled_from(["", "/", "/."]))
    if sometimes(draw, 5):
        e.train["seq_len"] = draw(st.sampled_from([16, 64]))
    if sometimes(draw, 10):
        e.train["global_batch_size"] = draw(st.sampled_from([4, 16]))
    gbs = e.value("global_batch_size", GBS)
    e.train["micro_batch_size"] = draw(st.sampled_from([m for m in (1, 2, 4, 8) if gbs % m == 0]))
    e.train["train_steps"] = draw(st.sampled_from([2, 3, 4, 5, 6, 6, 6, 6, 6, 6]))
    if sometimes(draw, 5):
        e.train["seed"] = 8
    if sometimes(draw, 5):
        e.data_seed = 99
    if sometimes(draw, 5):
        e.validation = {"data": [draw(st.sampled_from(["web", "extra"]))], "interval": draw(st.integers(1, 2)),
                        "num_samples": draw(st.integers(1, 2))}
    if sometimes(draw, 4):
        e.lr = draw(st.sampled_from([{"optimizer.lr": 1e-3}, {"lr_schedule.warmup_steps": 3},
                                     {"lr_schedule.decay_start_step": 4, "lr_schedule.decay_steps": 2},
                                     {"lr_schedule.decay_start_step": 5, "lr_schedule.decay_steps": 1,
                                      "lr_schedule.decay_style": "cosine", "lr_schedule.min_lr": 1e-4}]))
    if sometimes(draw, 4):
        e.model = draw(st.sampled_from([{"rope_theta": 20000.0}, {"rms_norm_eps": 1e-6}, {"init_std": 0.03},
                                        {"max_position_embeddings": 256}, {"document_mask_eos_id": 0},
                                        {"num_hidden_layers": 3}, {"vocab_size": 512},
                                        {"tie_word_embeddings": False}]))
    return e
