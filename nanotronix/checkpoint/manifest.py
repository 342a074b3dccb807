"""`checkpoint.json`: what a step folder holds, and the sizes and SHA-256 of every file in it.

DCP itself detects neither a truncated data file (it reads past the end or gets a short read deep inside
unpickling) nor flipped bits (it loads them as weights). The manifest records each file's size and hash when it
is written, so a damaged checkpoint is reported as one line naming the file before anything is loaded.

Fields: format, format_version, step, consumed_samples, data (per-dataset consumption from the loader), config
(the full run config), layout (tp/pp/dp/world size), rope_layout, optimizer (whether moments are stored),
optimizer_step, files {relative path: {size, sha256}}, source (where an imported checkpoint came from).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from nanotronix.checkpoint.errors import CheckpointError, unreadable
from nanotronix.checkpoint.paths import MANIFEST_NAME, step_of

FORMAT = "nanotronix-checkpoint"
FORMAT_VERSION = 1
_HASH_BLOCK = 16 << 20


def file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def digest_files(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {name: file_digest(folder / name) for name in names}


def list_files(folder: Path) -> list[str]:
    """Every file under `folder`, as POSIX paths relative to it (the manifest excluded)."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = Path(root, name).relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    path = folder / MANIFEST_NAME
    with open(path, "w") as f:
        json.dump(body, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def layout_text(layout: Any) -> str:
    """A manifest's `layout` as people read it: `tp 2 x pp 1 x dp 4 (8 ranks)`."""
    if not isinstance(layout, dict):
        return str(layout)
    world = layout.get("world_size")
    ranks = f"{world} rank" if world == 1 else f"{world} ranks"
    return f"tp {layout.get('tp')} x pp {layout.get('pp')} x dp {layout.get('dp')} ({ranks})"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The step's manifest, its fields checked (`check_fields`): every reader may then rely on their types."""
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} is incomplete: {MANIFEST_NAME} is missing") from None
    except OSError as e:
        raise unreadable(path, e) from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than json reads
        raise CheckpointError(f"checkpoint {path} is damaged: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nanotronix checkpoint manifest")
    version = manifest.get("format_version")
    if not _is_count(version) or version < 1:
        raise CheckpointError(f"checkpoint {path} is damaged: format_version is {_shown(version)}, not a version "
                              "number")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is newer than this nanotronix reads "
                              f"({FORMAT_VERSION}); upgrade nanotronix")
    if not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {path} is damaged: it lists no files")
    check_fields(path, manifest)
    return manifest


COUNT = "a whole number in 0..2^63-1"  # steps, samples, tokens, bytes: torch keeps them (an AdamW step) as 64 bits


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63  # not a bool, a float or a string of digits


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Optional sections of a manifest: each a mapping when present.
_MAPPINGS = ("data", "layout", "trainer_state", "source")


def check_fields(path: Path, manifest: dict[str, Any]) -> None:
    """The fields that the readers (export, evaluate, inspect, rollback, the trainer's resume) use, each of the type
    the writer gives it, so that a hand-edited or damaged manifest is one line naming the field rather than a
    traceback deep inside one of them, or a number that means nothing (a step of -1 or 4.5, a size of "12")."""
    def damaged(field: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is damaged: {field} is {_shown(value)}, not {expected}")

    if "step" not in manifest:
        raise CheckpointError(f"checkpoint {path} is damaged: it has no step")
    for field in ("step", "consumed_samples", "optimizer_step"):
        if field in manifest and not _is_count(manifest[field]):
            raise damaged(field, manifest[field], COUNT)
    named = step_of(path.parent)
    if named is not None and named != manifest["step"]:  # a folder renamed or a manifest copied by hand: a resume
        # picks the newest folder by its name and continues from the manifest's step; its saves would never be newer
        raise CheckpointError(f"checkpoint {path} is damaged: its step {manifest['step']} is not its folder's "
                              f"({path.parent.name})")
    if manifest.get("optimizer_step", 0) > manifest["step"]:  # skipped steps make fewer updates, never more
        raise CheckpointError(f"checkpoint {path} is damaged: optimizer_step {manifest['optimizer_step']} is more than "
                              f"its step {manifest['step']}")
    if "optimizer" in manifest and not isinstance(manifest["optimizer"], bool):
        raise damaged("optimizer", manifest["optimizer"], "true or false")
    config = manifest.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} is damaged: it holds no config with a model section")
    for section, value in config.items():
        if not isinstance(value, dict):
            raise damaged(f"config.{section}", value, "a mapping")
    tokenizer = config.get("data", {}).get("tokenizer")  # what the export ships and evaluate compares with the store's
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise damaged("config.data.tokenizer", tokenizer, "a tokenizer's path or Hub id")
    for field in _MAPPINGS:
        if field in manifest and not isinstance(manifest[field], dict):
            raise damaged(field, manifest[field], "a mapping")
    _check_data(manifest.get("data") or {}, damaged)
    hf = (manifest.get("source") or {}).get("hf", {})
    if not isinstance(hf, dict):
        raise damaged("source.hf", hf, "a mapping")
    # generation_config: null where the imported folder had none (the export then writes one from config.json's ids)
    for field, kind, expected in (("path", str, "a path"), ("config", dict, "a mapping"),
                                  ("generation_config", (dict, type(None)), "a mapping or null")):
        if field in hf and not isinstance(hf[field], kind):
            raise damaged(f"source.hf.{field}", hf[field], expected)
    for name, info in manifest["files"].items():
        if any(part in ("", ".", "..") for part in name.split("/")):  # absolute, empty, or climbing out
            raise damaged("a file name in files", name, "a path inside the step folder")
        if not isinstance(info, dict):
            raise damaged(f"files[{name!r}]", info, "a mapping of size and sha256")
        if not _is_count(info.get("size")):
            raise damaged(f"files[{name!r}].size", info.get("size"), COUNT)
        if not isinstance(info.get("sha256"), str) or not _SHA256.match(info["sha256"]):
            raise damaged(f"files[{name!r}].sha256", info.get("sha256"), "a SHA-256 (64 hex digits)")


def check_rope_layout(path: Path, manifest: dict[str, Any], computed: str) -> None:
    """The RoPE layout the manifest records is the one the model computes (`computed`): weights of another would need
    their q/k rows permuted, so a reader that takes them as they are (export, evaluate, resume) refuses them."""
    recorded = manifest.get("rope_layout", computed)  # absent: written before it was recorded, by this model
    if recorded != computed:
        raise CheckpointError(f"checkpoint {path}: rope_layout is {_shown(recorded)}, but this nanotronix computes "
                              f"{computed!r} (its q/k weights would need another layout)")


def _check_data(data: dict[str, Any], damaged) -> None:
    """The loader's state as `TrainLoader.state_dict` / `stats` saved it (per-dataset counts and fingerprints)."""
    if "consumed_samples" in data and not _is_count(data["consumed_samples"]):
        raise damaged("data.consumed_samples", data["consumed_samples"], COUNT)
    for field in ("datasets", "store_tokens", "store_fingerprints"):
        if field in data and not isinstance(data[field], dict):
            raise damaged(f"data.{field}", data[field], "a mapping")
    for name, got in (data.get("datasets") or {}).items():
        if not isinstance(got, dict):
            raise damaged(f"data.datasets[{name!r}]", got, "a mapping")
        if "consumed_tokens" in got and not _is_count(got["consumed_tokens"]):
            raise damaged(f"data.datasets[{name!r}].consumed_tokens", got["consumed_tokens"], COUNT)
    for name, tokens in (data.get("store_tokens") or {}).items():
        if not _is_count(tokens):
            raise damaged(f"data.store_tokens[{name!r}]", tokens, COUNT)


def check_sizes(folder: Path, manifest: dict[str, Any]) -> None:
    """Cheap check of every listed file: present and of the recorded size (catches truncation)."""
    for name, info in manifest["files"].items():
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file missing: {path}") from None
        except OSError as e:
            raise unreadable(path, e) from None
        if size != info["size"]:
            raise CheckpointError(f"checkpoint file damaged: {path} has {size} bytes, expected {info['size']} "
                                  "(truncated or overwritten)")


def check_hashes(folder: Path, manifest: dict[str, Any], names: Iterable[str]) -> None:
    """Full check of the given files against their recorded SHA-256 (catches flipped bits)."""
    for name in names:
        expected = manifest["files"][name]
        try:
            got = file_digest(folder / name)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file missing: {folder / name}") from None
        except OSError as e:
            raise unreadable(folder / name, e) from None
        if got["size"] != expected["size"]:
            raise CheckpointError(f"checkpoint file damaged: {folder / name} has {got['size']} bytes, expected "
                                  f"{expected['size']} (truncated or overwritten)")
        if got["sha256"] != expected["sha256"]:
            raise CheckpointError(f"checkpoint file damaged: {folder / name} does not match its SHA-256 in "
                                  f"{MANIFEST_NAME} (corrupted)")
