"""Single-process reading of any checkpoint, one logical tensor at a time (no torch.distributed needed).

Used by the Hugging Face export and `nanotronix.evaluate`: DCP assembles each full plain-model tensor from
whatever shards the saving layout wrote, and reads only the bytes of the tensors asked for, so memory stays
bounded by the tensors in flight rather than the checkpoint size.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from nanotronix.checkpoint import manifest as mf
from nanotronix.checkpoint import state as st
from nanotronix.checkpoint import storage
from nanotronix.checkpoint.errors import CheckpointError
from nanotronix.checkpoint.paths import MANIFEST_NAME, resolve_checkpoint
from nanotronix.config import ModelConfig
from nanotronix.config_checks import validate_model
from nanotronix.config_tree import build_dataclass
from nanotronix.errors import ConfigError
from nanotronix.model import build_model
from nanotronix.model.rope import ROPE_LAYOUT


def section_from_saved(cls: type, saved: Any, section: str, where: Path, check: Callable[[Any], None]) -> Any:
    """A section of a step's manifest config as a `cls`, checked as the trainer checks its config (each value of its
    field's type, then `check`); fields this version does not know (an older checkpoint's) are left out."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {where}: {MANIFEST_NAME}: {section} config is not a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        value = build_dataclass(cls, {k: v for k, v in saved.items() if k in known}, section)
        check(value)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {where}: {MANIFEST_NAME}: {e}") from None
    return value


def model_config_from_saved(saved: dict, where: Path) -> ModelConfig:
    """The model section of a step's manifest, checked as the trainer checks its config (each value of its field's
    type, then validate_model): an edited manifest that keeps the weights' shapes (rope_theta 0, a string for a
    number) would otherwise export a config.json that neither transformers nor the import accepts."""
    return section_from_saved(ModelConfig, saved, "model", where, validate_model)


def model_parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """The plain model's parameters in definition order (the tied head appears once, as the embedding), from a
    model built on the meta device (no memory)."""
    return {name: p.shape for name, p in build_model(cfg, device=torch.device("meta")).named_parameters()}


def stored_layer_count(metadata) -> int:
    """How many decoder layers a step's weights hold (distinct `model.layers.N.` indices in DCP's metadata)."""
    prefix = st.model_key("layers.")
    return len({key[len(prefix):].split(".", 1)[0] for key in metadata.state_dict_metadata if key.startswith(prefix)})


def still_there(folder: Path) -> None:
    """A step read for minutes (an export of a 1.7B model, a --verify) that a running run prunes meanwhile
    (checkpoint.keep_last): said as that, not as a damaged checkpoint (a file "missing", the step "incomplete")."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} was removed while it was being read (a running run's "
                              "checkpoint.keep_last prunes its older steps): read a step it keeps (a milestone: "
                              "checkpoint.keep_every / keep_steps) or a copy of the step")


class CheckpointReader:
    def __init__(self, path: str | os.PathLike):
        self.folder = resolve_checkpoint(path)
        try:  # a step pruned after it was chosen fails these reads as a missing file: said as the prune, like tensors()
            self.manifest = mf.read_manifest(self.folder)
            mf.check_sizes(self.folder, self.manifest)
            self.metadata = storage.dcp_metadata(self.folder)
        except CheckpointError:
            self._still_there()
            raise
        mf.check_rope_layout(self.folder, self.manifest, ROPE_LAYOUT)
        self.model_config = model_config_from_saved(self.manifest["config"]["model"], self.folder)
        layers = stored_layer_count(self.metadata)
        if layers != self.model_config.num_hidden_layers:  # before building it: 400000 layers take half an hour
            raise CheckpointError(f"checkpoint {self.folder} holds {layers} decoder layers, but the model config in "
                                  f"{MANIFEST_NAME} has num_hidden_layers={self.model_config.num_hidden_layers} (the "
                                  "manifest was edited, or the files mixed up)")
        shapes = model_parameter_shapes(self.model_config)
        self.parameter_names = list(shapes)
        missing = [n for n in self.parameter_names if st.model_key(n) not in self.metadata.state_dict_metadata]
        if missing:
            raise CheckpointError(f"checkpoint {self.folder} lacks tensor {st.model_key(missing[0])}")
        for name, shape in shapes.items():  # the config beside the weights must describe them
            if self.shape(name) != shape:
                raise CheckpointError(f"checkpoint {self.folder}: tensor {name} is {list(self.shape(name))}, but the "
                                      f"model config in {MANIFEST_NAME} makes it {list(shape)} (the manifest was "
                                      "edited, or the files mixed up)")
        self._verified: set[str] = set()

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.metadata.state_dict_metadata[st.model_key(name)].size)

    def dtype(self, name: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[st.model_key(name)].properties.dtype

    def verify(self, names: Iterable[str]) -> None:
        """SHA-256 check of the files holding these tensors (each file once per reader)."""
        keys = {st.model_key(n) for n in names}
        files = storage.files_holding(self.metadata, keys) | {storage.DCP_METADATA}
        todo = sorted(files - self._verified)
        unlisted = [f for f in todo if f not in self.manifest["files"]]
        if unlisted:
            raise CheckpointError(f"checkpoint file missing from the manifest: {self.folder / unlisted[0]}")
        mf.check_hashes(self.folder, self.manifest, todo)
        self._verified.update(todo)

    def tensors(self, names: list[str], dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """Full logical tensors (CPU) of the given parameter names."""
        state = {st.model_key(n): torch.empty(self.shape(n), dtype=self.dtype(n)) for n in names}
        try:
            self.verify(names)  # its hashing reads whole files: a prune then says "missing", said as the prune below
            self._still_there()  # before DCP's load, which logs tracebacks of its own on a missing folder
            storage.Collective(single_process=True).load(state, self.folder)
        except CheckpointError:
            self._still_there()
            raise
        return {n: state[st.model_key(n)] if dtype is None else state[st.model_key(n)].to(dtype) for n in names}

    def _still_there(self) -> None:
        still_there(self.folder)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter in model order, read one at a time."""
        for name in self.parameter_names:
            yield name, self.tensors([name])[name]

    def load_into(self, model: nn.Module) -> None:
        """Copy the weights into a plain model built from `self.model_config` (in place, tensor by tensor)."""
        params = dict(model.named_parameters())
        if set(params) != set(self.parameter_names):
            raise CheckpointError(f"checkpoint {self.folder}: the model's parameters differ from the saved ones")
        with torch.no_grad():
            for name, tensor in self.iter_tensors():
                params[name].copy_(tensor)
