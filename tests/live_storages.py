"""`LiveStorages`: what a piece of the model keeps alive, counted by storage (tests/test_plan_memory.py and the
pipeline worker tests/dist_plan_memory.py measure tools/plan.py's memory terms with it).

A dispatch mode notes every storage an op makes (a weak reference: it keeps nothing alive); what is still alive at a
point is what something (autograd's saved tensors and the views they hold, recompute's inputs and cache, a pipeline
schedule's caches) keeps. Each storage counts once; the parameters' own storages never count, and casts of a
parameter (autocast's bf16 weight copies) count apart from activations.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorages(TorchDispatchMode):
    """Weak references to the storages the ops make while on; `alive()` sums those that still exist. After every
    op, the peak of what is alive of those made since each `mark(name)`. A parameter's storage (and its views:
    `.t()`) is no activation; a cast of one is a weight copy. An op's output that shares an input's storage was not
    made by it."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params = params
        self.made: dict[int, tuple[StorageWeakRef, int, bool, int]] = {}  # data_ptr -> (ref, bytes, copy?, serial)
        self.serial = 0
        self.marks: dict[str, int] = {}
        self.peaks: dict[str, int] = {}
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        weight_copy = func is torch.ops.aten._to_copy.default and inputs[0].untyped_storage().data_ptr() in self.params
        # an output in the storage of an input (a view, an in-place op, a receive into a buffer) is nothing new: the
        # storage may have been made before the mode was on (gradient buckets, a pipeline stage's buffers)
        read = {t.untyped_storage().data_ptr() for t in inputs}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.params or key in read or storage.nbytes() == 0:
                    continue
                known = self.made.get(key)
                if known is None or known[0].expired():  # a freed storage's address can be handed out again
                    self.serial += 1
                    self.made[key] = (StorageWeakRef(storage), storage.nbytes(), weight_copy, self.serial)
        for name, serial in self.marks.items():
            self.peaks[name] = max(self.peaks[name], self.alive(since=serial)[0])
        return out

    def mark(self, name: str) -> None:
        self.marks[name], self.peaks[name] = self.serial, 0

    def alive(self, since: int = 0) -> tuple[int, int]:
        """(activation bytes, weight-copy bytes) of the storages made after serial `since` that still exist."""
        for key in [key for key, (ref, *_) in self.made.items() if ref.expired()]:
            del self.made[key]  # freed for good: what is scanned after every op stays what is alive
        live = [(n, copy) for ref, n, copy, serial in self.made.values() if serial > since]
        return sum(n for n, copy in live if not copy), sum(n for n, copy in live if copy)
