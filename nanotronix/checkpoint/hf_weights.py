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
A tensor held only under such a name is read from it, as transformers reads it (`name_of`: a base LlamaModel's folder
names every tensor without the prefix).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from nanotronix.convert.hf_mapping import read_json_object
from nanotronix.errors import UserError, json_kind

SINGLE_FILE = "model.safetensors"
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
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
        # the embedding of a tied model whose folder holds it only as its head: transformers ties the embedding to
        # the lm_head.weight it loads (the same logits), so it is read from there (`read_embedding_from_head`)
        self._embedding_from_head = False
        self._by_rest: dict[str, list[str]] = {}  # name[6:] -> the names: those `aliases` may strip `model?` from
        for key in self.location:
            self._by_rest.setdefault(key[6:], []).append(key)

    def __contains__(self, key: str) -> bool:
        return self.name_of(key) is not None

    def shape(self, key: str) -> list[int]:
        name = self.name_of(key)
        return list(self.handles[self.location[name]].get_slice(name).get_shape())

    def dtype(self, key: str) -> str:
        """safetensors' name of the tensor's type: F32, BF16, I8, F8_E4M3, ..."""
        name = self.name_of(key)
        return self.handles[self.location[name]].get_slice(name).get_dtype()

    def __getitem__(self, key: str) -> torch.Tensor:
        name = self.name_of(key)
        if name is None:
            raise KeyError(f"Hugging Face checkpoint lacks {key}")
        return self.handles[self.location[name]].get_tensor(name)

    def name_of(self, key: str) -> str | None:
        """The source's name transformers reads as the model's tensor `key`: `key` itself, else one of its `aliases`
        (every name of a base LlamaModel's folder lacks the prefix, of a `model.model.` folder has it twice); None
        where it holds none of them. Which alias, where several are held, differing_copy checks does not matter."""
        if key in self.location:
            return key
        alias = next(iter(self.aliases(key)), None)
        if alias is None and self._embedding_from_head and key == EMBEDDING:
            return self.name_of(HEAD)
        return alias

    def read_embedding_from_head(self) -> None:
        """A tied model's: where the folder holds no embedding under any name transformers reads as it, but a head,
        the embedding is that head, as transformers ties them (a folder saved with the head alone)."""
        self._embedding_from_head = True

    def said_as(self, key: str) -> str:
        """The model's tensor `key` as an error line names it: with the name its file holds it under, where that is
        another (`model.norm.weight (held as norm.weight)`), so that the line names what the folder holds."""
        name = self.name_of(key)
        return key if name in (key, None) else f"{key} (held as {name})"

    def aliases(self, key: str) -> list[str]:
        """The source's other names that transformers renames to the model's tensor `key` (`read_as`)."""
        candidates = self._by_rest.get(key, []) + [key.removeprefix("model.")]  # a prefix added, or dropped
        return [name for name in candidates
                if name != key and name in self.location and read_as(name, key.__eq__) == key]

    def differing_copy(self, key: str) -> tuple[str, str, str] | None:
        """(an opened file, the name in it, and how that tensor differs from tensor `key` as read: dtypes, shapes or
        values) of a copy that transformers may read as `key` instead: the name read (`name_of`) in another opened
        file, or another of its `aliases` (`key` itself, where held, is the name read); None when every such copy is
        the one read, bit for bit. Values are compared in floating point types only: a weight of another type is
        refused whichever copy is read."""
        name = self.name_of(key)
        read = self.handles[self.location[name]].get_slice(name)
        others = [(file, name) for file in self.copies[name][:-1]]
        others += [(file, alias) for alias in self.aliases(key) if alias != name for file in self.copies[alias]]
        for file, other_key in others:
            other = self.handles[file].get_slice(other_key)
            if other.get_dtype() != read.get_dtype():
                return file, other_key, f"dtypes ({other.get_dtype()}, {read.get_dtype()})"
            if other.get_shape() != read.get_shape():
                return file, other_key, f"shapes ({list(other.get_shape())}, {list(read.get_shape())})"
            if read.get_dtype() in FLOAT_DTYPES and \
                    not _same_bits(self.handles[file].get_tensor(other_key), self[key]):
                return file, other_key, "values"
        return None


def read_as(name: str, is_model_name: Callable[[str], bool]) -> str:
    """The name transformers 5 reads a source tensor NAME as, for a model whose names `is_model_name` tells
    (core_model_loading.rename_source_key, with LlamaForCausalLM's base_model_prefix `model`): NAME less a leading
    `model` and the character after it (its `^model.`, a regex: any one but a newline) where that is a model name,
    else `model.` + NAME where that is one, else NAME."""
    stripped = re.sub(r"^model.", "", name, count=1)
    if stripped != name and is_model_name(stripped):
        return stripped
    return f"model.{name}" if is_model_name(f"model.{name}") else name


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
    if any(folder.glob("*.bin")):  # transformers loads them (torch.load): the import reads each tensor when it
        # writes it, from safetensors files alone (memory bounded by one tensor, no unpickling)
        raise UserError(f"--hf: {folder}: only .bin (pickle) weights found; convert_from_hf reads .safetensors "
                        "(re-save the model with safe_serialization=True)")
    raise UserError(f"--hf: {folder}: no model.safetensors or model.safetensors.index.json")


def _named_file_names(folder: Path, named: object) -> list[str]:
    """The files behind config.json's `transformers_weights`: a .safetensors file, or a .safetensors.index.json
    whose shards are named relative to FOLDER (as transformers reads them), inside FOLDER."""
    where = f"--hf: {folder / 'config.json'}: transformers_weights"
    if not isinstance(named, str):
        raise UserError(f"{where} is a JSON {json_kind(named)}, not a file name")
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
        metadata = content["metadata"]  # transformers adds its own keys to it (and so refuses one missing); its
        # dtype, which transformers reads only for the type it loads weights in where neither the caller nor
        # config.json names one (refusing one that is no float type's name), is not read: weights are read in fp32
        if not isinstance(metadata, dict):
            raise TypeError(f"its metadata is a JSON {json_kind(metadata)}, not an object")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # not JSON, or no weight_map
        # of names; RecursionError: nested deeper than the JSON reader recurses
        why = f"no {e.args[0]!r}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise UserError(f"--hf: {index}: not a safetensors index ({why})") from None
    outside = [name for name in files if Path(name).anchor or ".." in Path(name).parts]
    if outside:  # transformers refuses these too: the index would read weights from another folder
        raise UserError(f"--hf: {index}: weight file {outside[0]} lies outside {folder}")
    return files
