"""Atomic output: every file a command writes first lives under a temporary name beside its final one and is
renamed into place only once complete and flushed, so an interrupted run never leaves an output that looks
finished. Readers look for the file renamed last (e.g. a Megatron `.idx`), which is the completion marker. Writers
hold their documents in a `DocumentSpill` until then."""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import socket
import stat
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import DataError


def _host_tag() -> str:
    """This host's name as staging names carry it (characters a file name may hold and a hostname normally has)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "_"


def temp_path(final: str | os.PathLike) -> Path:
    """The staging name of `final` in this process: `.NAME.tmp-HOST-PID` beside it. The host is in the name because
    a pid means something only on its host: on a file system that several nodes share, a writer on another node
    must not find its staging file judged abandoned here (`remove_abandoned_temps`)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{_host_tag()}-{os.getpid()}")


def replaced_path(final: str | os.PathLike) -> Path:
    """What `commit` stages an older folder at `final` under (`temp_path` of this name) while the new one goes in."""
    final = Path(final)
    return final.with_name(f"{final.name}.replaced")


def remove_abandoned_temps(*staged: str | os.PathLike, suffix: str = "") -> list[Path]:
    """Delete the temporary files and folders that killed writers left beside the paths in `staged`: the outputs,
    and any other names a writer stages under `temp_path` (a store's `.lengths`, `replaced_path`), each named
    exactly, so that another output's staging files (`.NAME.v2.bin.tmp-...` beside `NAME`'s) are never taken for
    these. One is removed when its process is gone from this host: `.NAME.tmp-HOST-PID` with this host's name, or
    `.NAME.tmp-PID` (the name older versions gave, which carries no host). A SIGKILLed preprocess or converter
    cannot clean up, and its leftovers are as large as the output. A writer on another host is never judged by
    its pid here; one on this host that is alive stays. `suffix`: what the writer adds after the pid
    (`replace_file`'s, for a format told by its extension). Returns what was removed."""
    host = re.escape(_host_tag())
    patterns = {}
    for path in map(Path, staged):  # a pid: ASCII digits, not any \d
        patterns.setdefault(path.parent, []).append(
            rf"\.{re.escape(path.name)}\.tmp-(?:{host}-)?([0-9]+){re.escape(suffix)}")
    removed = []
    for folder, names in patterns.items():
        pattern = re.compile("|".join(f"(?:{name})" for name in names))
        try:
            entries = sorted(folder.iterdir())
        except OSError:  # no folder yet: nothing left there
            continue
        for entry in entries:
            found = pattern.fullmatch(entry.name)
            if found and _process_is_gone(int(next(g for g in found.groups() if g is not None))):
                remove_quietly(entry)
                removed.append(entry)
    return removed


def note_removed_temps(removed: list[Path]) -> None:
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
        print(f"note: removed what an interrupted run left beside the output (its process is gone): {names}",
              file=sys.stderr)


def _process_is_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's live process (EPERM)
        return False
    return False


def file_identity(path: str | os.PathLike) -> Optional[tuple[int, int]]:
    """(device, inode) of `path`, None when there is none: a rename keeps it, so a writer can tell whether what is at
    its final name is what it staged (the rename done) whatever stopped it around that rename."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's fsync makes the names made or renamed in it durable). A folder on a file
    system that has no fsync for folders (Linux says EINVAL: SMB/CIFS before Linux 4.17, some FUSE and Ceph mounts)
    is left to the file system's own commit, as every program there must; a lost write says EIO or ENOSPC."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL or not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise
    finally:
        os.close(fd)


def fsync_folder_if_allowed(folder: str | os.PathLike) -> None:
    """fsync a folder this user may not be able to open (a parent of mode 711, only traversable): then the file
    system's own commit stands in, as it does for every program that cannot fsync there. A folder that opens but
    whose fsync fails (EIO: a lost write) fails the caller, as a file's does."""
    with contextlib.suppress(PermissionError):
        fsync_path(folder)


def missing_levels(folder: str | os.PathLike) -> list[Path]:
    """The levels of `folder` that do not exist yet, deepest first: what `mkdir -p folder` would make."""
    folder = Path(folder)
    return list(itertools.takewhile(lambda p: not os.path.lexists(p), [folder, *folder.parents]))


def make_folder_durably(folder: str | os.PathLike) -> list[Path]:
    """`mkdir -p folder` whose new levels survive a power loss: a new folder's entry is in its parent, durable only
    once the parent is fsynced (an output or run folder made with new levels above it could otherwise vanish with
    every file committed in it, though each file and its own folder were fsynced). Returns the levels this call
    made, deepest first (one another process made meanwhile is not among them), for a caller that removes them
    again when its work fails (`remove_made_folders`); a failure here removes them itself."""
    made: list[Path] = []
    try:
        for level in reversed(missing_levels(folder)):
            try:
                level.mkdir()
            except FileExistsError:
                if not level.is_dir():  # a file where a folder was to be: the caller's error
                    raise
                continue  # made meanwhile by someone else: theirs, not ours to remove
            made.insert(0, level)
            fsync_folder_if_allowed(level.parent)
        if not os.path.isdir(folder):  # a file (or a dangling link) where the folder is: mkdir -p's error
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(folder))
    except BaseException:
        remove_made_folders(made)
        raise
    return made


def remove_made_folders(made: list[Path]) -> None:
    """Remove the folders a failed command made (`make_folder_durably`'s list, deepest first), so that it leaves no
    trace: rmdir only, never a recursive delete, so a folder that holds anything (a file someone else wrote there
    since) is not ours to remove and stays, as do the levels above it."""
    for level in made:
        try:
            os.rmdir(level)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):  # EEXIST: some systems' "not empty"
                print(f"note: could not remove the folder {level} that this run made ({e.strerror or e})",
                      file=sys.stderr)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder in it, deepest first (a zarr store's chunks, an exported
    model's config and tokenizer files: written by libraries that do not fsync)."""
    folders = []
    for root, _, files in os.walk(folder):
        folders.append(root)
        for name in files:
            fsync_path(os.path.join(root, name))
    for root in reversed(folders):
        fsync_path(root)


def commit(temp: str | os.PathLike, final: str | os.PathLike, replace: bool = True) -> None:
    """Flush `temp` (a file, or a folder and everything in it) to disk, rename it to `final` (replacing an older
    file or folder of that name), and fsync the folder holding it: once this returns, `final` is complete and
    survives a power loss (a rename is durable only once its folder is fsynced). At no moment does `final` hold a
    part of the older folder: it is renamed aside whole before it is removed (removed in place, a removal stopped by
    a signal left a zarr store missing chunk files, which zarr reads as fill values). replace=False (a command run
    without --overwrite, whose check that `final` was free came minutes before): a `final` that appeared since (an
    empty folder aside) is a FileExistsError, and is left as it is."""
    temp, final = Path(temp), Path(final)
    appeared = "appeared while this command ran (another one writing there?); left as it is, nothing written"
    if not replace and os.path.lexists(final) and not (final.is_dir() and not final.is_symlink()
                                                       and not any(final.iterdir())):
        raise FileExistsError(errno.EEXIST, appeared, str(final))
    if temp.is_dir() and not temp.is_symlink():
        fsync_tree(temp)
    else:
        fsync_path(temp)
    replaced = None
    if replace and final.is_dir() and not final.is_symlink():  # a folder cannot be renamed over one holding files
        replaced = temp_path(replaced_path(final))
        remove_quietly(replaced)
        os.replace(final, replaced)
    try:
        os.replace(temp, final)
    except BaseException as e:
        if replaced is not None:  # the older one back in its place
            os.replace(replaced, final)
        if not replace and isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, appeared, str(final)) from None  # a folder that appeared since
        raise
    fsync_folder_if_allowed(final.parent)
    if replaced is not None:
        remove_quietly(replaced)


def remove_quietly(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:  # never made (a parent that is a file, a read-only file system): nothing to remove
            pass


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    temp = temp_path(path)
    try:
        with os_errors_naming(temp):
            temp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        commit(temp, path)
    except BaseException:  # a full disk: no partial temporary file left beside `path`
        remove_quietly(temp)
        raise


class DocumentSpill:
    """Documents appended to two raw files in bounded memory, the tokens one after another and each document's length
    (int32): what a store writer holds until it finalizes (the Megatron writer's token file becomes its `.bin`)."""

    def __init__(self, tokens_path: Path, lengths_path: Path, dtype: np.dtype):
        self.tokens_path, self.lengths_path = tokens_path, lengths_path
        self.dtype = np.dtype(dtype)
        self._tokens = open(tokens_path, "wb")
        try:
            self._lengths = open(lengths_path, "wb")
        except BaseException:  # no caller holds a spill that failed to start, to remove() it
            self._tokens.close()
            remove_quietly(tokens_path)
            raise
        self.num_documents = 0
        self.num_tokens = 0

    def add(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as one flat token array and the length of each (sum(lengths) == size)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(flat_tokens):
            raise ValueError("document lengths do not add up to the token count")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise DataError("a document longer than 2^31-1 tokens cannot be stored")
        with os_errors_naming(self.tokens_path):
            self._tokens.write(np.ascontiguousarray(flat_tokens, dtype=self.dtype).tobytes())
        with os_errors_naming(self.lengths_path):
            self._lengths.write(lengths.astype(np.int32).tobytes())
        self.num_documents += len(lengths)
        self.num_tokens += len(flat_tokens)

    def close(self) -> None:
        """Close both files, the second one even when the first one's buffered bytes cannot be written."""
        try:
            with os_errors_naming(self.tokens_path):
                self._tokens.close()
        finally:
            with os_errors_naming(self.lengths_path):
                self._lengths.close()

    def remove(self) -> None:
        """Discard both files. After a write failed on a full disk, closing fails again on the bytes still buffered:
        that must not keep the files (as large as what the disk held) from being removed."""
        try:
            with contextlib.suppress(OSError):
                self.close()
        finally:
            remove_quietly(self.tokens_path)
            remove_quietly(self.lengths_path)


@contextlib.contextmanager
def os_errors_naming(path: Path):
    """An OSError of a write to an open file names no file ("No space left on device"): name `path`, so the error line
    says which disk filled."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


class SpillingWriter:
    """A store writer whose documents wait in `self._spill` until it finalizes."""
    _spill: DocumentSpill

    @property
    def num_documents(self) -> int:
        return self._spill.num_documents

    @property
    def num_tokens(self) -> int:
        return self._spill.num_tokens

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each (sum(lengths) == size)."""
        self._spill.add(flat_tokens, lengths)
