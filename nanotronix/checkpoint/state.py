"""Model and optimizer state as a DCP state dict of LOGICAL plain-model tensors.

Every entry is keyed by the plain model's parameter name and describes this rank's piece of the full tensor:

    model.<fqn>                 the parameter (fp32 master weight)
    optim.exp_avg.<fqn>         AdamW first moment
    optim.exp_avg_sq.<fqn>      AdamW second moment

A tensor-parallel shard (`param.tp_shard_dim = d`: the tensor is split over TP into equal contiguous chunks
along d, rank r holding chunk r) is wrapped as a DTensor on a 1-D mesh over the TP group, which tells DCP where
the chunk sits in the logical tensor. Replicated tensors are plain tensors. DCP writes each distinct chunk once
(data-parallel replicas and TP-replicated norms dedupe) and on load reads whatever stored chunks overlap each
rank's piece, so a checkpoint written in any TP x PP x DP reloads in any other. A pipeline stage simply lacks
the names it does not own.

Each distinct chunk is collected by one rank only (`assign_writers`, decided before anything is copied): every
rank holding all of its pieces would have DCP drop the replicas only when writing, after an asynchronous save had
staged them all to host memory (1.7B without ZeRO: ~20 GB per rank, ~160 GB per 8-GPU node, for a checkpoint whose
every byte one rank of the node writes) and after ZeRO-1 had cloned every moment on every GPU.

Tied embeddings: `lm_head.weight` IS `embed_tokens.weight`, stored once under `embed_tokens.weight`. The plain
model shares one Parameter (named_parameters lists it once), and under pipeline parallelism both ends hold
`embed_tokens.weight` (DCP writes the identical chunks once); a tied model listing a separate `lm_head.weight` is
refused rather than guessed at.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from nanotronix.checkpoint.errors import CheckpointError

MODEL_PREFIX = "model."
MOMENTS = ("exp_avg", "exp_avg_sq")
TIED_HEAD = "lm_head.weight"


def model_key(fqn: str) -> str:
    return MODEL_PREFIX + fqn


def optim_key(moment: str, fqn: str) -> str:
    return f"optim.{moment}.{fqn}"


@dataclass
class LocalPiece:
    """This rank's piece of one logical tensor."""
    tensor: torch.Tensor
    shard_dim: Optional[int]  # None: the whole tensor (replicated or unsharded)


def shard_dim_of(param: torch.Tensor, tp: int) -> Optional[int]:
    return getattr(param, "tp_shard_dim", None) if tp > 1 else None


def check_tied_head(named_params, tied: bool) -> None:
    if tied and any(fqn == TIED_HEAD for fqn, _ in named_params):
        raise RuntimeError("tied embeddings, but lm_head.weight is a separate parameter: checkpoints expect it to "
                           "be the embed_tokens.weight Parameter itself")


# --------------------------------------------------------------------------------------------------
# optimizer access


class OptimizerStateAccess(Protocol):
    """What the checkpoint needs from an optimizer; `nanotronix.parallel.DistributedOptimizer` implements it."""

    step_count: int  # optimizer steps taken (AdamW's bias-correction step)

    # {fqn: {"exp_avg", "exp_avg_sq"}} of the parameters in `names` (None: all); a collective call under ZeRO-1.
    # Possibly the optimizer's own state tensors (no copies on the GPU at a save): read them before the next step.
    def param_states(self, names: Optional[set[str]] = None) -> dict[str, dict[str, torch.Tensor]]: ...

    # the names of the parameters whose moments a load reads together, group by group (the moments held at once
    # beyond the optimizer's own state); every parameter whose state this rank keeps is in one of them
    def load_groups(self) -> list[list[str]]: ...

    # the moments of the parameters in `states` (a load hands them over one group at a time), after `step_count` steps
    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]], step_count: int) -> None: ...


class TorchAdamWAccess:
    """`OptimizerStateAccess` for a single-process torch.optim.AdamW (or apex FusedAdam) over a plain model.

    The moments live in `optimizer.state[param]`; names come from the model. Loading creates the state the
    optimizer would have after `step_count` updates, so the next update is bit-identical to an uninterrupted run.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer = optimizer
        self.names = {id(p): name for name, p in model.named_parameters()}

    def _params(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                yield group, p

    @property
    def step_count(self) -> int:
        for group, p in self._params():
            state = self.optimizer.state.get(p)
            if state and "step" in state:
                return int(state["step"])
            if "step" in group:  # apex FusedAdam counts per group
                return int(group["step"])
        return 0

    def param_states(self, names: Optional[set[str]] = None) -> dict[str, dict[str, torch.Tensor]]:
        """Moments of every parameter (of those in `names`): the optimizer's own state tensors, not copies; zeros
        before its first update (what AdamW starts from)."""
        out = {}
        for _, p in self._params():
            if names is not None and self.names[id(p)] not in names:
                continue
            state = self.optimizer.state.get(p)
            has = bool(state) and "exp_avg" in state
            out[self.names[id(p)]] = {m: state[m] if has else torch.zeros_like(p) for m in MOMENTS}
        return out

    def load_groups(self) -> list[list[str]]:
        """One parameter at a time: the load holds one parameter's moments beyond those already handed over."""
        return [[self.names[id(p)]] for _, p in self._params()]

    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]], step_count: int) -> None:
        for group, p in self._params():
            name = self.names[id(p)]
            if name not in states:
                continue
            on_device = group.get("fused") or group.get("capturable")  # where torch's AdamW keeps `step`
            state = self.optimizer.state[p]
            state["step"] = torch.tensor(float(step_count), dtype=torch.float32,
                                         device=p.device if on_device else "cpu")
            for m in MOMENTS:
                state[m] = states[name][m].to(device=p.device, dtype=p.dtype).contiguous()
            if "step" in group:
                group["step"] = step_count


def optimizer_access(optimizer: Any, model: nn.Module) -> Any:
    if all(hasattr(optimizer, method) for method in ("param_states", "load_groups", "load_param_states")):
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        return TorchAdamWAccess(optimizer, model)
    raise TypeError(f"cannot checkpoint optimizer {type(optimizer).__name__}: it needs param_states(), "
                    "load_groups() and load_param_states()")


# --------------------------------------------------------------------------------------------------
# collecting pieces (save) and targets (load)


def save_chunks(model: nn.Module, tp: int, tp_rank: int) -> dict[str, tuple[tuple, int]]:
    """Every key this rank can save -> (which chunk of the logical tensor it holds, its bytes). Two ranks holding
    the same chunk hold the same values (data-parallel replicas, TP-replicated norms, both pipeline ends' tied
    embedding), so one of them writes it. Moments are saved for the trainable parameters (what a load restores)."""
    out = {}
    for fqn, p in model.named_parameters():
        dim = shard_dim_of(p, tp)
        chunk = (-1, 0, tuple(p.shape)) if dim is None else (dim, tp_rank, tuple(p.shape))
        size = p.numel() * p.element_size()
        out[model_key(fqn)] = (chunk, size)
        if p.requires_grad:
            out.update({optim_key(m, fqn): (chunk, size) for m in MOMENTS})
    return out


def assign_writers(chunks_by_rank: list[dict[str, tuple[tuple, int]]]) -> list[set[str]]:
    """Rank r's `save_chunks` at index r -> the keys each rank writes: every distinct chunk exactly once, by the
    holder with the fewest bytes assigned so far, largest chunks first (balanced, and the same on every rank)."""
    holders: dict[tuple[str, tuple], tuple[int, list[int]]] = {}
    for rank, chunks in enumerate(chunks_by_rank):
        for key, (chunk, size) in chunks.items():
            holders.setdefault((key, chunk), (size, []))[1].append(rank)
    assigned = [0] * len(chunks_by_rank)
    writes: list[set[str]] = [set() for _ in chunks_by_rank]
    for (key, _), (size, ranks) in sorted(holders.items(), key=lambda item: (-item[1][0], item[0])):
        writer = min(ranks, key=lambda r: (assigned[r], r))
        assigned[writer] += size
        writes[writer].add(key)
    return writes


class WriterPlan:
    """The keys this rank writes, kept from one save to the next: every rank's `save_chunks` are gathered and
    assigned (`assign_writers`) at the first save, and again only when some rank's chunks have changed (a run's layout
    does not change, so in practice never). A later save gathers one digest per rank instead of every rank's key
    list, and skips the assignment's Python loop over all of them: at hundreds of ranks ~10^5 entries, which would
    otherwise be part of every asynchronous save's pause."""

    def __init__(self):
        self._digests: Optional[list[str]] = None
        self._writes: set[str] = set()

    def keys(self, model: nn.Module, tp: int, tp_rank: int, coll: Any) -> set[str]:
        """This rank's keys; collective over `coll` (every rank of it decides alike: all see the same digests)."""
        chunks = save_chunks(model, tp, tp_rank)
        digests = coll.all_gather(hashlib.sha256(repr(sorted(chunks.items())).encode()).hexdigest())
        if digests != self._digests:
            self._writes = assign_writers(coll.all_gather(chunks))[coll.rank]
            self._digests = digests
        return self._writes


def model_pieces(model: nn.Module, tp: int, tied: bool, keys: Optional[set[str]] = None) -> dict[str, LocalPiece]:
    """Checkpoint key -> this rank's piece, for every parameter this rank owns (whose key is in `keys`)."""
    params = list(model.named_parameters())
    check_tied_head(params, tied)
    return {model_key(fqn): LocalPiece(p.detach(), shard_dim_of(p, tp)) for fqn, p in params
            if keys is None or model_key(fqn) in keys}


def optimizer_pieces(access: Any, model: nn.Module, tp: int, coll: Any,
                     keys: Optional[set[str]] = None) -> dict[str, LocalPiece]:
    """The moments' pieces (those whose keys are in `keys`); every rank of `coll` calls it (ZeRO-1 gathers over DP,
    and a trainable parameter without moments is every rank's error: see below)."""
    params = dict(model.named_parameters())
    names = None if keys is None else {fqn for fqn in params if any(optim_key(m, fqn) in keys for m in MOMENTS)}
    states = access.param_states(names)
    missing = sorted(names - set(states)) if names is not None else []
    # Only the rank that writes the parameter finds it missing (made trainable after the optimizer was built, or left
    # out of it); the others would go on into the write's collectives and fail there without saying why.
    first = next((name for name in coll.all_gather(missing[0] if missing else None) if name), None)
    if first is not None:
        raise CheckpointError(f"cannot save a checkpoint: the optimizer holds no state for trainable parameter {first} "
                              "(made trainable after the optimizer was built, or left out of it?)", every_rank=True)
    out = {}
    for fqn, moments in states.items():
        dim = shard_dim_of(params[fqn], tp)
        for m in MOMENTS:
            if keys is None or optim_key(m, fqn) in keys:
                out[optim_key(m, fqn)] = LocalPiece(moments[m].detach(), dim)
    return out


class TensorParallelMeshes:
    """1-D DeviceMeshes over this rank's TP group (one per device type), built without collectives."""

    def __init__(self, tp_group: Optional[dist.ProcessGroup], tp: int):
        self.tp_group, self.tp = tp_group, tp
        self._meshes: dict[str, Any] = {}

    def get(self, device_type: str):
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import DeviceMesh

            if self.tp_group is None:
                raise RuntimeError("tensor-parallel shards need the TP process group")
            self._meshes[device_type] = DeviceMesh.from_group(self.tp_group, device_type)
        return self._meshes[device_type]


def logical_shape(piece: LocalPiece, tp: int) -> torch.Size:
    shape = list(piece.tensor.shape)
    if piece.shard_dim is not None:
        shape[piece.shard_dim] *= tp
    return torch.Size(shape)


def to_dcp(pieces: dict[str, LocalPiece], meshes: TensorParallelMeshes) -> dict[str, Any]:
    """Wrap TP shards as DTensors (views: loading into them writes the original storage)."""
    out: dict[str, Any] = {}
    for key, piece in pieces.items():
        if piece.shard_dim is None:
            out[key] = piece.tensor
            continue
        from torch.distributed.tensor import DTensor, Shard

        shape = logical_shape(piece, meshes.tp)
        stride = torch.empty(shape, device="meta").stride()
        out[key] = DTensor.from_local(piece.tensor, meshes.get(piece.tensor.device.type),
                                      [Shard(piece.shard_dim)], run_check=False, shape=shape, stride=stride)
    return out


@dataclass
class LoadTargets:
    """Where a load writes: the weights in place (`pieces`, views of the parameters), the moments into fresh buffers
    made for one group of parameters at a time (`moment_buffers`), so that a load never holds every moment at once."""
    pieces: dict[str, LocalPiece]
    moments: dict[str, LocalPiece]  # optimizer key -> a stand-in on the meta device (shape, dtype, shard dim)
    devices: dict[str, torch.device]  # fqn -> where its moment buffers go: its parameter's device

    def moment_buffers(self, names: list[str]) -> dict[str, LocalPiece]:
        """Fresh buffers for the moments of the parameters `names`: optimizer key -> piece."""
        return {optim_key(m, fqn): LocalPiece(torch.empty_like(self.moments[optim_key(m, fqn)].tensor,
                                                               device=self.devices[fqn]),
                                              self.moments[optim_key(m, fqn)].shard_dim)
                for fqn in names for m in MOMENTS}


def model_targets(model: nn.Module, tp: int, tied: bool) -> LoadTargets:
    params = list(model.named_parameters())
    check_tied_head(params, tied)
    return LoadTargets({model_key(fqn): LocalPiece(p.detach(), shard_dim_of(p, tp)) for fqn, p in params}, {}, {})


def add_optimizer_targets(targets: LoadTargets, model: nn.Module, tp: int, stored_dtype) -> None:
    """Stand-ins (TP-local shape, no memory) for every trainable parameter's moments; `stored_dtype(key)` gives the
    dtype the checkpoint holds them in."""
    for fqn, p in model.named_parameters():
        if not p.requires_grad:
            continue
        for m in MOMENTS:
            stand_in = torch.empty(p.shape, dtype=stored_dtype(optim_key(m, fqn)), device="meta")
            targets.moments[optim_key(m, fqn)] = LocalPiece(stand_in, shard_dim_of(p, tp))
        targets.devices[fqn] = p.device
