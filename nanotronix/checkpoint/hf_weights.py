"""The tensors of a Hugging Face model folder, read from the files transformers' `from_pretrained` reads them from.

transformers 5 (modeling_utils._get_resolved_checkpoint_files, utils.hub.get_checkpoint_shard_files) opens, for a
local folder: the file config.json's `transformers_weights` names, else model.safetensors, else the shards that
model.safetensors.index.json's weight_map names (the distinct names, sorted); it loads every tensor of every file
it opens, a later file's over an earlier one's, whatever the weight_map says of each tensor. So the weight_map
chooses files, not tensors: a tensor of an opened file that the map leaves out is read, one mapped to a file that
lacks it is read from whichever opened file holds it, and files the map does not name are not opened. A tensor held
by two opened files with different contents is refused where it is imported (`differing_copy`): which copy a reader
takes depends on its order of the files (transformers the later name's, a reader following the map the map's). So is
one also held under a name transformers renames to it (`aliases`: model.model.norm.weight, norm.weight) with other
contents: transformers takes the first of the two in its order of the names, a reader by the model's names that one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from nanotronix.convert.hf_mapping import read_json_object
from nanotronix.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the types a weight is read from
# a file transformers takes as the sign of a distributed checkpoint (transformers.distributed.checkpoint): it then
# reads every .safetensors file of the folder through torch.distributed.checkpoint instead of the files named here
# (its pattern as it matches it, $ included)
_DISTRIBUTED_SHARD = re.compile(r"^shard-[0-9]{5}-model-[0-9]{5}-of-[0-9]{5}\.safetensors$")


class SafetensorsFolder:
    """Lazy access to the tensors of a Hugging Face folder's weight files (module docstring). `location` gives each
    tensor's file, the one transformers takes it from; `copies` every opened file holding it, in transformers'
    order. `named` is config.json's `transformers_weights` (None when it has none)."""

    def __init__(self, folder: Path, named: object = None):
        from safetensors import safe_open

        stray = sorted(p.name for p in folder.iterdir() if _DISTRIBUTED_SHARD.match(p.name))
        if stray:
            raise UserError(f"--hf: {folder}: {stray[0]} makes transformers read the folder as a distributed "
                            "checkpoint (every .safetensors file of it), which convert_from_hf does not read")
        files, named_in = _weight_file_names(folder, named)
        self.handles: dict[str, Any] = {}
        self.copies: dict[str, list[str]] = {}
        opened = set()
        for name in files:
            path = folder / name
            if not path.is_file():
                raise UserError(f"--hf: {folder}: weight file {name} named in {named_in} is missing")
            if path.resolve() in opened:  # one file named twice (./a.safetensors, a.safetensors): the same tensors
                continue
            opened.add(path.resolve())
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors' own error type: a truncated or foreign file
                raise UserError(f"--hf: {path}: cannot be read as safetensors ({' '.join(str(e).split())})") from None
            self.handles[name] = handle
            for key in handle.keys():
                self.copies.setdefault(key, []).append(name)
        self.location = {key: names[-1] for key, names in self.copies.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def shape(self, key: str) -> list[int]:
        return list(self.handles[self.location[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """safetensors' name of the tensor's type: F32, BF16, I8, F8_E4M3, ..."""
        return self.handles[self.location[key]].get_slice(key).get_dtype()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.location:
            raise KeyError(f"Hugging Face checkpoint lacks {key}")
        return self.handles[self.location[key]].get_tensor(key)

    def aliases(self, key: str) -> list[str]:
        """The source's other names that transformers renames to the model's tensor `key` (core_model_loading's
        rename_source_key): a name with LlamaForCausalLM's base_model_prefix before it (`model.model.norm.weight`;
        transformers strips `^model.`, a regex: any one character after `model`), or without the one it has
        (`norm.weight` for `model.norm.weight`)."""
        prefixed = [name for name in self.location if name.startswith("model") and name[6:] == key
                    and name[5:6] not in ("", "\n")]
        bare = key[len("model."):] if key.startswith("model.") and key[len("model."):] in self.location else None
        return prefixed + ([bare] if bare else [])

    def differing_copy(self, key: str) -> tuple[str, str, str] | None:
        """(an opened file, the name in it, and how that tensor differs from tensor `key` as read: dtypes, shapes or
        values) of a copy that transformers may read as `key` instead: `key` in another opened file, or one of its
        `aliases`; None when every such copy is the one read, bit for bit. Values are compared in floating point types
        only: a weight of another type is refused whichever copy is read."""
        read = self.handles[self.location[key]].get_slice(key)
        others = [(name, key) for name in self.copies[key][:-1]]
        others += [(name, alias) for alias in self.aliases(key) for name in self.copies[alias]]
        for name, other_key in others:
            other = self.handles[name].get_slice(other_key)
            if other.get_dtype() != read.get_dtype():
                return name, other_key, f"dtypes ({other.get_dtype()}, {read.get_dtype()})"
            if other.get_shape() != read.get_shape():
                return name, other_key, f"shapes ({list(other.get_shape())}, {list(read.get_shape())})"
            if read.get_dtype() in FLOAT_DTYPES and \
                    not _same_bits(self.handles[name].get_tensor(other_key), self[key]):
                return name, other_key, "values"
        return None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, so that NaNs of one payload are the same and 0.0 and -0.0 are not."""
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _weight_file_names(folder: Path, named: object) -> tuple[list[str], str]:
    """The weight files transformers opens in FOLDER, in its order (relative to FOLDER), and what names them (for
    the line saying one is missing); UserError where transformers refuses them or convert_from_hf cannot read them."""
    if named is not None:  # transformers loads the file config.json names, whatever else the folder holds
        return _named_file_names(folder, named), "config.json's transformers_weights"
    if (folder / SINGLE_FILE).is_file():  # taken over an index beside it (an older save's), which is not read
        return [SINGLE_FILE], SINGLE_FILE
    if (folder / INDEX_FILE).is_file():
        return _indexed_file_names(folder, folder / INDEX_FILE), "the index"
    if any(folder.glob("*.bin")):
        raise UserError(f"--hf: {folder}: only .bin (pickle) weights found; convert_from_hf reads .safetensors "
                        "(re-save the model with safe_serialization=True)")
    raise UserError(f"--hf: {folder}: no model.safetensors or model.safetensors.index.json")


def _named_file_names(folder: Path, named: object) -> list[str]:
    """The files behind config.json's `transformers_weights`: a .safetensors file, or a .safetensors.index.json
    whose shards are named relative to FOLDER (as transformers reads them), inside FOLDER."""
    where = f"--hf: {folder / 'config.json'}: transformers_weights"
    if not isinstance(named, str):
        raise UserError(f"{where} is a JSON {_json_kind(named)}, not a file name")
    if not named.endswith((".safetensors", ".safetensors.index.json")):  # transformers refuses them (an adapter's
        # .bin it reads: convert_from_hf reads no .bin)
        raise UserError(f"{where}: {named!r} is not a .safetensors or .safetensors.index.json file")
    base = os.path.abspath(folder)
    if os.path.commonpath([base, os.path.abspath(os.path.join(base, named))]) != base:
        raise UserError(f"{where}: {named!r} lies outside {folder}")
    if not named.endswith(".index.json"):
        return [named]
    if not (folder / named).is_file():
        raise UserError(f"--hf: {folder}: weight file {named} named in config.json's transformers_weights is "
                        "missing")
    return _indexed_file_names(folder, folder / named)


def _indexed_file_names(folder: Path, index: Path) -> list[str]:
    """The shards INDEX's weight_map names, distinct and sorted, as transformers opens them; UserError for an index
    transformers refuses: not a JSON object of a weight_map of file names and a metadata object, or naming a shard
    outside FOLDER."""
    try:
        content = read_json_object(index)
        weight_map = content["weight_map"]
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise TypeError("its weight_map names a file by something other than a string")
        files = sorted(set(weight_map.values()))
        metadata = content["metadata"]  # transformers adds its own keys to it (and so refuses one missing)
        if not isinstance(metadata, dict):
            raise TypeError(f"its metadata is a JSON {_json_kind(metadata)}, not an object")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # not JSON, or no weight_map
        # of names; RecursionError: nested deeper than the JSON reader recurses
        why = f"no {e.args[0]!r}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise UserError(f"--hf: {index}: not a safetensors index ({why})") from None
    outside = [name for name in files if Path(name).anchor or ".." in Path(name).parts]
    if outside:  # transformers refuses these too: the index would read weights from another folder
        raise UserError(f"--hf: {index}: weight file {outside[0]} lies outside {folder}")
    return files


def _json_kind(value: object) -> str:
    """JSON's name of VALUE's type (null, true, a list is an array), for a line saying what was found instead."""
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
