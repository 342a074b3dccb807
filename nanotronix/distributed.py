"""Process start-up and teardown under torchrun (or as one plain process).

NCCL on CUDA and gloo on CPU, same code path. Teardown ends with `os._exit`: on gloo a process that used
DTensor collectives can abort at interpreter exit after its work is done (see the shared ENVIRONMENT notes), which
torchrun would report as a failed run.

When one rank stops on an error, the others fail in their next collective: `peer_stopped` tells that failure
from a bug of their own, so that they say it in one line each instead of a traceback that hides the one error
that matters (the first rank's). Where bad input may stop some ranks or all (a start-up step that reads files),
`stopping_together` has them agree first, so that an error every rank met is said once. Where the rank that says its
error knows that it speaks for the ranks it stops (a bad batch: the other model replicas), it notes so in the job's
c10d store (`note_cause_said`) before it exits, and those keep quiet when their collective fails (`cause_said_by`);
where nothing was noted (that rank died first, or its error is its own alone), each still says its line.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.distributed as dist

from nanotronix.errors import UserError, found_behind

if TYPE_CHECKING:
    from nanotronix.checkpoint.storage import Collective


def pick_device(requested: str, option: str = "train.device") -> torch.device:
    """cuda (this process's LOCAL_RANK GPU) or cpu for `requested` (auto: cuda if there is one); `option` names
    where it was asked for, in the error when CUDA is missing."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"{option}: cuda requested but CUDA is not available")
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= gpus:  # torch.cuda.set_device's own error is a traceback, on every rank past the last GPU
            raise UserError(f"{option}: {requested} puts local rank {local_rank} on GPU {local_rank}, but this node "
                            f"shows {gpus} CUDA GPU(s) (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {gpus} process(es) "
                            f"per node, or set {option}=cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_minutes: float = 10.0) -> None:
    """Join the torchrun process group; a single plain process runs without one."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    with joining(timeout_minutes):
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
        if dist.get_rank() == 0:
            # torchrun's agent keeps its store, and the keys in it, across the restarts it makes (--max-restarts,
            # elastic rounds): an earlier attempt's note would quiet this one's stopped ranks. A note is made only
            # after a collective with rank 0 (the run's start-up has them), so none of this attempt's is lost here
            # (were one, its ranks would say an extra line, never lose one).
            dist.distributed_c10d._get_default_store().delete_key(CAUSE_SAID_KEY)


@contextlib.contextmanager
def joining(timeout_minutes: float) -> Iterator[None]:
    """The ranks meeting to form the process group or a group of it (`new_group` is collective too: gloo connects
    every member to every other): a timeout there is the ranks not all arriving in time (torch's store, or gloo's
    connection mesh), said in one line naming the setting instead of a traceback on each rank."""
    try:
        yield
    except RuntimeError as e:
        if not isinstance(e, dist.DistStoreError) and "timed out" not in str(e) and "timeout" not in str(e):
            raise
        why = " ".join(str(e).split())
        raise UserError(f"the ranks did not all join within parallel.collective_timeout_minutes={timeout_minutes:g} "
                        f"({why}): a node that started late, or a rank that failed first") from None


def shutdown_and_exit(code: int) -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int:
    """This process's rank; before the process group exists (a bad config is found first), torchrun's RANK."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


class PeerStopped(Exception):
    """This rank stops because another one did: said in one line, exit 1 (the other rank's error is the cause).
    `every_rank`: every rank that did not fail raises the same one, so rank 0 says it for all. `said_elsewhere`: the
    rank that stopped it said its error for this one too (`cause_said_by`), so this rank keeps quiet."""

    def __init__(self, message: object = "", *, every_rank: bool = False, said_elsewhere: bool = False):
        super().__init__(message)
        self.every_rank = every_rank
        self.said_elsewhere = said_elsewhere


# How a collective reports a peer that is gone: gloo's TCP transport ("Connection closed by peer ... This is
# typically caused by a remote worker crashing", or the socket's own errno text), NCCL's aborted communicator.
PEER_GONE_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote worker crashing",
                   "communicator was aborted")


def peer_stopped(error: BaseException) -> Optional[str]:
    """If `error` (or one behind it) is a collective failing because another rank has stopped, its message's first
    sentence; else None. Network and store errors count too: the store lives in rank 0's agent."""
    gone = found_behind(error, lambda e: isinstance(e, (dist.DistNetworkError, dist.DistStoreError)) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in PEER_GONE_WORDS)))
    if gone is None:
        return None
    said = str(gone)
    said = said.split("] ", 1)[-1] if said.startswith("[") else said  # gloo's [file.cc:line] prefix
    return " ".join(said.split(". ")[0].split())


# Where in the job's c10d store (torchrun's agent's, kept across its restarts: rank 0 clears the key as the process
# group forms) a rank that said the error stopping the run notes its rank, for the ranks it stops; and how long a call
# to the store may take, so that a store that went away never holds up a failing rank's exit.
CAUSE_SAID_KEY = "nanotronix/cause_said_by_rank"
CAUSE_STORE_TIMEOUT = datetime.timedelta(seconds=5)


def _job_store():
    """The default process group's store, with a short timeout (this rank is on its way out); None without one."""
    if not dist.is_initialized():
        return None
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(CAUSE_STORE_TIMEOUT)
    return store


def note_cause_said(store=None) -> None:
    """Note in the job's store (or `store`) that this rank has said the error that stops the others: called after
    the line is out, so that a rank dying between the two leaves an extra line, never a lost one. A store that
    cannot be reached notes nothing (the others then say their lines)."""
    store = _job_store() if store is None else store
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(CAUSE_SAID_KEY, str(rank()))
            # torch's TCPStore does not answer a set, and serves each connection in order: the note is in the store
            # once a query after it on this connection is answered. Without this one, the others' check (on their
            # own connections, as this rank's exit fails their collectives) could be served first and miss it.
            store.check([CAUSE_SAID_KEY])


def cause_said_by(store=None) -> Optional[int]:
    """The rank that noted in the job's store (or `store`) that it said the error stopping the run, else None:
    nothing noted, no store, or one that cannot be reached (its host gone), so that the caller says its line."""
    store = _job_store() if store is None else store
    if store is None:
        return None
    try:
        return int(store.get(CAUSE_SAID_KEY)) if store.check([CAUSE_SAID_KEY]) else None
    except Exception:
        return None


NAMED_RANKS = 8  # failed ranks named one by one in an error line; the rest are counted


def ranks_text(ranks: list[int], hosts: Optional[dict[int, str]] = None) -> str:
    """`rank 3` or `ranks 1, 2, ... 8 and 5 more` (the first NAMED_RANKS named), each followed by its host where
    `hosts` has it (`rank 3 (node7)`): which ranks met something, in one line however many did."""
    named = ", ".join(f"{r} ({hosts[r]})" if hosts and r in hosts else str(r) for r in ranks[:NAMED_RANKS])
    more = f" and {len(ranks) - NAMED_RANKS} more" if len(ranks) > NAMED_RANKS else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {named}{more}"


@contextlib.contextmanager
def stopping_together(coll: "Collective", where: str) -> Iterator[None]:
    """Run the block, then agree over `coll` (one all-gather that every rank reaches, whether its block failed or
    not) on which ranks met bad input (a UserError) in it. If every rank did, it is the same input (the same stores
    and config; the messages may differ in what each rank read): the error goes on as every_rank, so rank 0 alone
    says its own, which stands for all (thousands of GPUs, one line). If some did (a file missing from one node's
    disk), each of those says its own, and the others stop with a PeerStopped that rank 0 alone says, instead of
    going on into a collective that waits for the failed ones."""
    error: Optional[UserError] = None
    try:
        yield
    except UserError as e:
        error = e
    failed = [r for r, met in enumerate(coll.all_gather(error is not None)) if met]
    if error is not None:
        error.every_rank = error.every_rank or len(failed) == coll.size
        raise error
    if failed:
        whose = "its error says" if len(failed) == 1 else "their errors say"
        raise PeerStopped(f"{where}: bad input stopped {ranks_text(failed)} ({whose} why), so this one stops too",
                          every_rank=True)
