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
from pathlib import Path
from typing import Any, Iterable

from nanotronix.checkpoint.errors import CheckpointError, unreadable
from nanotronix.checkpoint.paths import MANIFEST_NAME

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
    return f"tp {layout.get('tp')} x pp {layout.get('pp')} x dp {layout.get('dp')} ({layout.get('world_size')} ranks)"


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} is incomplete: {MANIFEST_NAME} is missing") from None
    except OSError as e:
        raise unreadable(path, e) from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is damaged: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nanotronix checkpoint manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is newer than this nanotronix reads "
                              f"({FORMAT_VERSION}); upgrade nanotronix")
    if not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {path} is damaged: it lists no files")
    return manifest


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
