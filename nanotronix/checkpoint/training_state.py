"""A training run's whole resumable state: weights, AdamW moments, step, data position, RNG, config, layout.

`take_snapshot` (main thread, between steps) collects this rank's pieces, copying them to host memory when the save
is asynchronous (`staging.HostStaging`); `write_snapshot` writes them (in the main thread or a background one);
`load_training_state` puts a checkpoint back into a model and optimizer of any layout (the weights in place, then
the moments one gradient bucket at a time).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from nanotronix.checkpoint import manifest as mf
from nanotronix.checkpoint import paths
from nanotronix.checkpoint import state as st
from nanotronix.checkpoint import storage
from nanotronix.checkpoint.errors import CheckpointError
from nanotronix.checkpoint.rng import capture_rng, load_rng, restore_rng, rng_file
from nanotronix.checkpoint.staging import HostStaging
from nanotronix.distributed import stopping_together
from nanotronix.model.rope import ROPE_LAYOUT


def layout_of(ctx) -> dict[str, int]:
    return {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "world_size": ctx.world_size}


@dataclass
class Snapshot:
    step: int
    pieces: dict[str, st.LocalPiece]
    rng: dict[str, Any]
    manifest: dict[str, Any]
    global_rank: int
    meshes: st.TensorParallelMeshes = field(repr=False)


def _settle_weights(model) -> None:
    """A parallel model's ZeRO-1 weight all-gathers may still run after a step (parallel.overlap_param_gather):
    wait for them before reading or writing the weights. Plain models have none."""
    grads = getattr(model, "grads", None)
    if grads is not None:
        grads.wait_for_weights()


def take_snapshot(step: int, model, optimizer, ctx, config: dict[str, Any], data_state: dict[str, Any],
                  staging: Optional[HostStaging], coll: storage.Collective,
                  trainer_state: Optional[dict[str, Any]] = None, source: Optional[dict[str, Any]] = None,
                  writers: Optional[st.WriterPlan] = None) -> Snapshot:
    """This rank's state after `step`; `data_state` holds consumed_samples and per-dataset consumption,
    `trainer_state` what the training loop keeps beyond the model (the spike guard's window), `source` where the
    run's weights first came from (an imported Hugging Face model: its config and generation config, which the export
    writes back). With `staging` (an asynchronous save) the pieces are copied into its host buffers, so the training
    may go on while they are written; without, they are the model's and optimizer's own tensors (no copies), to be
    written before the training changes them. Collective over `coll` (the group `write_snapshot` writes with): this
    rank collects only the pieces it will write (`state.assign_writers`; `writers` keeps that from an earlier save)."""
    tied = bool(config["model"]["tie_word_embeddings"])
    _settle_weights(model)
    access = st.optimizer_access(optimizer, model)
    writes = (writers or st.WriterPlan()).keys(model, ctx.tp, ctx.tp_rank, coll)
    pieces = st.model_pieces(model, ctx.tp, tied, writes)
    pieces.update(st.optimizer_pieces(access, model, ctx.tp, coll, writes))
    if staging is not None:
        pieces = staging.stage(pieces)
    optimizer_step = getattr(access, "step_count", None)
    manifest = {
        "step": step,
        "consumed_samples": int(data_state.get("consumed_samples", 0)),
        "data": data_state,
        "config": config,
        "layout": layout_of(ctx),
        "rope_layout": ROPE_LAYOUT,
        "optimizer": True,
        "optimizer_step": step if optimizer_step is None else int(optimizer_step),
        "torch_version": torch.__version__,
        "trainer_state": dict(trainer_state or {}),
        **({"source": source} if source else {}),
    }
    return Snapshot(step, pieces, capture_rng(), manifest, ctx.rank, st.TensorParallelMeshes(ctx.tp_group, ctx.tp))


def write_snapshot(snapshot: Snapshot, run_dir: Path, coll: storage.Collective,
                   retention: Optional[paths.Retention] = None) -> Path:
    """Commit `snapshot` as a step of `run_dir`, then prune by `retention` (None: keep every step)."""
    return storage.write_step(run_dir, snapshot.step, st.to_dcp(snapshot.pieces, snapshot.meshes),
                              snapshot.manifest, snapshot.rng, snapshot.global_rank, coll,
                              retention or paths.Retention())


def _check_shapes(folder: Path, metadata, pieces: dict[str, st.LocalPiece], tp: int) -> None:
    stored = metadata.state_dict_metadata
    for key, piece in pieces.items():
        if key not in stored:
            raise CheckpointError(f"checkpoint {folder} has no tensor {key} (saved from a different model?)")
        want, have = st.logical_shape(piece, tp), torch.Size(stored[key].size)
        if want != have:
            raise CheckpointError(f"checkpoint {folder} holds {key} of shape {tuple(have)}, but this model's is "
                                  f"{tuple(want)}: the model config differs from the saved one")


def load_training_state(folder: Path, model, optimizer: Optional[Any], ctx, coll: storage.Collective,
                        tied: bool, restore_rng_state: bool = True) -> dict[str, Any]:
    """Load weights (and, when the checkpoint has them and `optimizer` is given, AdamW moments and step count)
    into this rank's model/optimizer, whatever layout saved them; return the manifest."""
    _settle_weights(model)  # a weight gather still in flight would overwrite what is loaded
    # Each rank reads the step's manifest, file sizes and DCP metadata alone, before the load's first collective: the
    # ranks agree on how that went, so that a file every rank fails to read (damaged, on the file system they share) is
    # said once, by rank 0, and one that some ranks fail to read (a node's own mount) stops the others at once.
    with stopping_together(coll, f"loading checkpoint {folder}"):
        manifest = mf.read_manifest(folder)
        mf.check_rope_layout(folder, manifest, ROPE_LAYOUT)
        mf.check_sizes(folder, manifest)  # first: a truncated .metadata is said as that, not as one that won't unpickle
        metadata = storage.dcp_metadata(folder)
        targets = st.model_targets(model, ctx.tp, tied)
        with_optimizer = optimizer is not None and manifest.get("optimizer", False)
        if with_optimizer:
            dtypes = metadata.state_dict_metadata

            def stored_dtype(key: str) -> torch.dtype:
                if key not in dtypes:
                    raise CheckpointError(f"checkpoint {folder} has no tensor {key} (saved from a different model?)")
                return dtypes[key].properties.dtype

            st.add_optimizer_targets(targets, model, ctx.tp, stored_dtype)
        _check_shapes(folder, metadata, {**targets.pieces, **targets.moments}, ctx.tp)
    same_layout = manifest.get("layout") == layout_of(ctx)
    restore = restore_rng_state and same_layout and rng_file(folder, ctx.rank).is_file()
    extra = [rng_file(folder, ctx.rank).relative_to(folder).as_posix()] if restore else []
    storage.verify_step(folder, manifest, metadata, set(targets.pieces) | set(targets.moments), extra, coll)

    meshes = st.TensorParallelMeshes(ctx.tp_group, ctx.tp)
    storage.read_step(folder, st.to_dcp(targets.pieces, meshes), coll)
    if with_optimizer:
        access = st.optimizer_access(optimizer, model)
        _load_moments(folder, targets, access, int(manifest.get("optimizer_step", manifest["step"])), meshes, coll)
    if restore:
        restore_rng(load_rng(folder, ctx.rank))
    manifest["_restored"] = {"optimizer": with_optimizer, "rng": restore}
    return manifest


def _load_moments(folder: Path, targets: st.LoadTargets, access, step_count: int, meshes: st.TensorParallelMeshes,
                  coll: storage.Collective) -> None:
    """The moments, one of `access.load_groups()` at a time (a gradient bucket of a `DistributedOptimizer`): each
    group's full TP-local buffers are handed over, and freed, before the next group's are made, so a load holds at
    most one group's moments beyond the optimizer's own state (all of them at once would undo ZeRO-1's saving at
    every resume). A DCP read is collective: every rank reads as many times as the rank with the most groups (another
    pipeline stage holds other buckets), reading nothing once its own groups are done."""
    groups = [names for names in ([n for n in g if n in targets.devices] for g in access.load_groups()) if names]
    reads = max(max(coll.all_gather(len(groups))), 1)  # at least one: every rank's optimizer gets its step count
    for i in range(reads):
        access.load_param_states(_read_moments(folder, targets, groups[i] if i < len(groups) else [], meshes, coll),
                                 step_count)


def _read_moments(folder: Path, targets: st.LoadTargets, names: list[str], meshes: st.TensorParallelMeshes,
                  coll: storage.Collective) -> dict[str, dict[str, torch.Tensor]]:
    """{fqn: {moment: buffer}} of the parameters `names`, read from the step folder (collective over `coll`)."""
    pieces = targets.moment_buffers(names)
    storage.read_step(folder, st.to_dcp(pieces, meshes), coll)
    return {fqn: {m: pieces[st.optim_key(m, fqn)].tensor for m in st.MOMENTS} for fqn in names}
