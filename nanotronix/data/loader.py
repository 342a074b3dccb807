"""The trainer's data loader: this data-parallel rank's share of each global batch, as a pure function of the
step.

Global step s (1-based) holds global samples [(s-1)*GBS, s*GBS). DP rank r takes the contiguous slice
[r*GBS/dp, (r+1)*GBS/dp) of it, reshaped to [grad_accum, micro_batch_size, seq_len+1], so the global batch
(and hence the run) does not depend on the number of ranks. The only resume state is the number of consumed
samples (the global count over all ranks), which is what `state_dict()` returns.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Optional

import numpy as np
import torch

from .errors import DataError
from .schedule import BlendSchedule, PackedStream, dataset_order_key
from .store import TokenStore, first_outside_vocabulary, open_store, require_integer_tokens


# Batches travel as int32 (every vocabulary fits) and become int64 on the device (train/step.py): half the bytes
# of int64 to allocate, write, pin and copy; fresh int64 buffers of a whole global batch were dominated by page
# faults (tools/bench_data.py, sampler vs raw memmap slicing: 0.44 with int64, 0.6-0.7 with int32).
BATCH_DTYPE = torch.int32
BATCH_DTYPE_NP = np.int32


class TrainLoader:
    def __init__(self, schedule: BlendSchedule, stores: dict[str, TokenStore], seq_len: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                 vocab_size: Optional[int] = None):
        gbs = schedule.global_batch_size
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if gbs % (micro_batch_size * dp_size):
            raise DataError(f"train.global_batch_size {gbs} is not divisible by micro_batch_size*dp = "
                            f"{micro_batch_size}*{dp_size}")
        if consumed_samples < 0 or consumed_samples % gbs:
            raise DataError(f"consumed_samples {consumed_samples} is not a multiple of the global batch size {gbs}")
        self.schedule = schedule
        self.stores = stores
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = gbs
        self.grad_accum = gbs // (micro_batch_size * dp_size)
        self.consumed_samples = consumed_samples
        self.vocab_size = vocab_size  # token ids read are checked against it (a damaged store: one line)
        # per dataset: (samples consumed at the resumed step, tokens they held then, epochs read then, None where the
        # checkpoint does not say); see count_tokens_from
        self._tokens_before: dict[str, tuple[int, int, Optional[float]]] = {}
        # the checkpoint's datasets this config no longer has (dropped, renamed): their saved stats, kept in ours
        self._gone: dict[str, dict[str, Any]] = {}

    @property
    def next_step(self) -> int:
        return self.consumed_samples // self.global_batch_size + 1

    def global_sample_ids(self, step: int) -> np.ndarray:
        """Global sample numbers this rank reads for `step`, in [grad_accum, micro_batch] order."""
        if step < 1:
            raise DataError(f"steps are numbered from 1, got {step}")
        per_rank = self.global_batch_size // self.dp_size
        first = (step - 1) * self.global_batch_size + self.dp_rank * per_rank
        return np.arange(first, first + per_rank, dtype=np.int64)

    def read_samples(self, sample_ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Token windows [n, seq_len+1] (int32) of the given global sample numbers, written into `out` when given
        (e.g. a pinned buffer, saving a copy)."""
        names, which, starts = self.schedule.locate(sample_ids)
        if out is None:
            out = np.empty((len(sample_ids), self.seq_len + 1), dtype=BATCH_DTYPE_NP)
        top = -1  # the largest id read, as unsigned: the stores take it while the rows are in cache
        for d in np.unique(which).tolist():
            rows = np.flatnonzero(which == d)
            top = max(top, self.stores[names[d]].read_windows(out, rows, starts[rows]))
        if self.vocab_size is not None and top >= self.vocab_size:
            self._name_the_bad_store(out, names, which, starts)
        return out

    def _name_the_bad_store(self, windows: np.ndarray, names, which: np.ndarray, starts: np.ndarray) -> None:
        """Raise the DataError for the first window whose token ids fall outside the model's vocabulary (without
        this, the embedding's IndexError, a traceback on every rank). The windows are read again from the stores
        in their own dtype: an int64 id may have wrapped into the vocabulary's range in the int32 batch."""
        length = windows.shape[1]
        for row in range(len(windows)):
            store = self.stores[names[which[row]]]
            bad = first_outside_vocabulary(store.tokens(int(starts[row]), length), self.vocab_size)
            if bad is not None:
                raise DataError(f"token store {names[which[row]]}: token id {bad} (in the window at token "
                                f"{int(starts[row])}) is outside the model's vocabulary ({self.vocab_size}): the "
                                "store is damaged or was made with another tokenizer (tools/inspect_store.py "
                                "PREFIX --verify)")

    def read_batch(self, step: int, pin_memory: bool = False) -> torch.Tensor:
        """This rank's share of global step `step`: int32 [grad_accum, micro_batch_size, seq_len+1], read
        into page-locked memory when `pin_memory` (needs CUDA). Pure: it does not advance the resume state, so a
        prefetcher may call it ahead of the step (nanotronix/data/prefetch.py)."""
        shape = (self.grad_accum, self.micro_batch_size, self.seq_len + 1)
        # Unpinned, the buffer comes from numpy: glibc's malloc hands the last batch's freed pages back, where
        # torch's CPU allocator maps fresh ones that fault in on every write (~1.5 ms of 2.4 for 1024 x 2049
        # tokens). Pinned buffers come from CUDA's caching host allocator, reused as well.
        batch = torch.empty(shape, dtype=BATCH_DTYPE, pin_memory=True) if pin_memory else \
            torch.from_numpy(np.empty(shape, dtype=BATCH_DTYPE_NP))
        self.read_samples(self.global_sample_ids(step), out=batch.numpy().reshape(-1, self.seq_len + 1))
        return batch

    def mark_consumed(self, step: int) -> None:
        """Record that the batch of `step` has been handed to training (the resume state)."""
        self.consumed_samples = step * self.global_batch_size

    def batch(self, step: int) -> torch.Tensor:
        """This rank's share of global step `step`: int32 [grad_accum, micro_batch_size, seq_len+1]."""
        batch = self.read_batch(step)
        self.mark_consumed(step)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise DataError(f"consumed_samples {consumed} is not a multiple of the global batch size "
                            f"{self.global_batch_size}")
        self.consumed_samples = consumed

    def stats(self, step: int, fingerprints: bool = False) -> dict[str, Any]:
        """Active stage at `step` and, per dataset, tokens consumed and epochs after `step` (whole run), and the
        tokens each store holds (what its sample order is cut from) and, with `fingerprints`, its content
        fingerprint (what its windows hold) and the sha256 of the tokenizer file its sidecar names: a checkpoint
        keeps them, so a resume can say when a store it read from has changed, and the export when the tokenizer it
        ships is not the stores'. Only the rank that writes the manifest and says the notes asks for fingerprints: a
        few hundred small reads per store, which thousands of ranks would repeat on a shared file system at every
        start.
        Datasets are named as validation stores are (`dataset_order_key`: the path relative to data.root under it)."""
        consumed = self.schedule.consumed(step * self.global_batch_size)
        datasets, store_tokens, store_fingerprints, store_tokenizers = {}, {}, {}, {}
        for name, count in consumed.items():
            stream = self.schedule.streams[name]
            samples_then, tokens_then, _ = self._tokens_before.get(name, (0, 0, None))
            tokens = tokens_then + (count - samples_then) * self.seq_len
            datasets[stream.order_key] = {"consumed_tokens": tokens, "epochs": self._epochs(name, count)}
            store_tokens[stream.order_key] = self.stores[name].num_tokens
            if fingerprints:
                store_fingerprints[stream.order_key] = self.stores[name].fingerprint
                if self.stores[name].tokenizer_info.get("sha256"):  # what the HF export checks its tokenizer by
                    store_tokenizers[stream.order_key] = self.stores[name].tokenizer_info["sha256"]
        for key, got in self._gone.items():
            datasets.setdefault(key, dict(got))
        return {"stage": self.schedule.stage_at_step(step).name, "datasets": datasets, "store_tokens": store_tokens,
                **({"store_fingerprints": store_fingerprints, "store_tokenizers": store_tokenizers}
                   if fingerprints else {})}


    def epochs(self, step: int) -> dict[str, float]:
        """Per dataset (named as in `stats`), how many times over its store the run has read by `step` (the sampler's
        arithmetic only)."""
        streams = self.schedule.streams
        return {streams[name].order_key: self._epochs(name, count)
                for name, count in self.schedule.consumed(step * self.global_batch_size).items()}

    def _epochs(self, name: str, count: int) -> float:
        """Epochs of dataset `name` once `count` of its samples are consumed: after a resume, the checkpoint's epochs
        plus the windows read since at this run's length (a resume with another train.seq_len or blend would
        otherwise count the samples before it at the new windows per epoch: 1.13 epochs of a store read 0.64 times)."""
        stream = self.schedule.streams[name]
        samples_then, _, epochs_then = self._tokens_before.get(name, (0, 0, None))
        if epochs_then is None or epochs_then == stream.epochs(samples_then):  # unchanged: an uninterrupted run's,
            return stream.epochs(count)  # bit for bit (a sum of two quotients may differ in the last bit)
        return epochs_then + stream.epochs(count - samples_then)

    def count_tokens_from(self, saved: dict[str, Any], step: int) -> None:
        """Resuming at `step` from a checkpoint whose data state (`stats` then) is `saved`: count each dataset's tokens
        on from what the checkpoint says it had consumed, so that a run whose train.seq_len changed on resume (the
        8k stage) does not count the earlier steps' samples at the new length, nor one whose blend changed the
        samples the new blend would have given before the resume."""
        consumed = self.schedule.consumed(step * self.global_batch_size)
        saved_datasets = saved.get("datasets") or {}
        # A dataset the checkpoint counted and this config no longer lists (dropped, or renamed: another key) keeps
        # its count in the stats, so the run's consumed tokens (their sum) and its later checkpoints still hold what
        # it gave, instead of dropping by that much at the resume.
        keys = {stream.order_key for stream in self.schedule.streams.values()}
        self._gone = {key: _carried(got) for key, got in saved_datasets.items()
                      if key not in keys and "consumed_tokens" in got}
        for name, count in consumed.items():
            got = saved_datasets.get(self.schedule.streams[name].order_key, {})
            tokens = got.get("consumed_tokens")
            epochs = _carried(got).get("epochs") if tokens is not None else None
            if tokens is None and saved_datasets:  # a dataset the checkpoint's config did not have: none read yet
                tokens, epochs = 0, 0.0  # (a blend changed on resume would otherwise count its samples before it)
            if tokens is not None:
                self._tokens_before[name] = (count, int(tokens), epochs)


def _carried(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved dataset's stats as carried on: its token count (read_manifest checked it) and its epochs where they are
    a finite float, as `stats` writes them (a hand-edited manifest may hold anything there: 10**400 is no float)."""
    epochs = saved.get("epochs")
    number = type(epochs) is float and math.isfinite(epochs)
    return {"consumed_tokens": saved["consumed_tokens"], **({"epochs": epochs} if number else {})}


def data_root_hint(cfg, paths: list[str]) -> str:
    """Where relative store paths were read from when data.root is not set (a forgotten data.root gives "not found"
    for a path that is right under it), to append to an error about them; "" otherwise."""
    relative = any(not os.path.isabs(os.path.expanduser(p)) and "://" not in p for p in paths)
    if cfg.data.root is not None or not relative:
        return ""
    return f" (data.root is not set: relative paths are read from {os.getcwd()})"


def build_train_loader(cfg, dp_rank: int, dp_size: int, consumed_samples: int = 0,
                       earlier_order_keys: Iterable[str] = ()) -> TrainLoader:
    """Open every store of `cfg.data.stages` and build this rank's loader (fast: reads only store headers);
    `earlier_order_keys`: the dataset keys of the checkpoint resumed from (`dataset_order_key`)."""
    seq_len, gbs = cfg.train.seq_len, cfg.train.global_batch_size
    stores: dict[str, TokenStore] = {}
    stages = []
    for stage in cfg.data.stages:
        for ds in stage.datasets:
            if ds.path not in stores:
                try:
                    stores[ds.path] = require_integer_tokens(open_store(ds.path), ds.path)
                except DataError as e:  # a forgotten data.root: said by the trainer as by the preflight
                    hint = data_root_hint(cfg, [ds.path])
                    if hint and "not found" in str(e):
                        raise DataError(f"{e}{hint}") from None
                    raise
        stages.append((stage.name, stage.start_step, [(ds.path, ds.weight) for ds in stage.datasets]))
    same: dict[str, str] = {}
    for name, store in stores.items():  # one store under two spellings would be two datasets: weights and counts split
        where = store.path if "://" in store.path else os.path.realpath(store.path)
        if same.setdefault(where, name) != name:
            both = [k for k, stage in enumerate(cfg.data.stages)
                    if {same[where], name} <= {ds.path for ds in stage.datasets}]
            fix = (f"list it once in data.stages.{both[0]}, with the weights added" if both else
                   "spell it the same way in every stage (a dataset in several stages reads on where it stopped)")
            raise DataError(f"data.stages: datasets {same[where]} and {name} are the same token store ({where}): "
                            f"{fix}")
    vocab = cfg.model.vocab_size
    for name, store in stores.items():
        if vocab is not None and store.vocab_size is not None and store.vocab_size > vocab:
            raise DataError(f"token store {name}: its tokenizer has {store.vocab_size} tokens, more than "
                            f"model.vocab_size={vocab}")
    streams = {name: PackedStream(name, store.num_tokens, seq_len, cfg.data.data_seed,
                                  order_key=dataset_order_key(name, cfg.data.root, earlier_order_keys))
               for name, store in stores.items()}
    keyed: dict[str, str] = {}
    for name, stream in streams.items():  # two stores (`x` and `x.zarr`): one shuffle key, one entry in the stats
        first = keyed.setdefault(stream.order_key, name)
        if first != name:
            raise DataError(f"data.stages: datasets {first} and {name} are two token stores with one dataset key, "
                            f"{stream.order_key} (a store file's suffix does not count): they would be read in the "
                            "same order and counted as one dataset; rename one of them")
    schedule = BlendSchedule(stages, gbs, streams)
    return TrainLoader(schedule, stores, seq_len, cfg.train.micro_batch_size, dp_rank, dp_size,
                       consumed_samples, vocab_size=vocab)
