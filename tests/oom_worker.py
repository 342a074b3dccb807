"""Worker for tests/test_train_cli.py: the real trainer, where step 3 meets a GPU out of memory (torch.OutOfMemoryError
with torch's own wording; a CPU machine has no GPU allocator to exhaust).
`oom_worker.py [--only-rank=R] [--in-forward] [--bug] --config ...`: on rank R only (the others meet R's absence),
else on every rank; raised by the training step itself, or (--in-forward) by a layer's MLP inside the model's
forward, where a pipeline schedule runs it (torch.distributed.pipelining re-raises it wrapped); --bug: a plain
RuntimeError instead (a defect of the code, said as a traceback), in the same place."""
import os
import sys

import torch

import nanotronix.model.mlp as mlp
import nanotronix.train.trainer as trainer
from nanotronix.train.main import main

_train_step, _mlp_forward = trainer.train_step, mlp.SwiGLU.forward
TORCH_SAID = ("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
              "1.02 GiB is free. Including non-PyTorch memory, this process has 78.16 GiB memory in use. Of the "
              "allocated memory 74.11 GiB is allocated by PyTorch, and 2.53 GiB is reserved by PyTorch but "
              "unallocated. If reserved but unallocated memory is large try setting "
              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
              "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


def failure() -> Exception:
    return RuntimeError("a defect in the training step") if BUG else torch.OutOfMemoryError(TORCH_SAID)


def meets_it() -> bool:
    return train_step.calls == 3 and ONLY_RANK in (None, os.environ.get("RANK", "0"))


def train_step(*args):
    train_step.calls += 1
    if meets_it() and not IN_FORWARD:
        raise failure()
    return _train_step(*args)


def mlp_forward(self, x):
    if meets_it() and IN_FORWARD:
        raise failure()
    return _mlp_forward(self, x)


train_step.calls = 0
trainer.train_step = train_step
mlp.SwiGLU.forward = mlp_forward
if __name__ == "__main__":
    args = sys.argv[1:]
    ONLY_RANK = args.pop(0).split("=")[1] if args[0].startswith("--only-rank=") else None
    IN_FORWARD = args[0] == "--in-forward"
    args = args[1:] if IN_FORWARD else args
    BUG = args[0] == "--bug"
    main(args[1:] if BUG else args)
