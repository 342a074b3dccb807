"""nanotronix/checkpoint/run_lock.py on a file system without locks (Lustre mounted without flock, NFS with its lock
daemon down: flock fails with ENOLCK or ENOSYS): the folder goes unlocked, and the user is told so."""
from __future__ import annotations

import errno
import fcntl

import pytest

from nanotronix.checkpoint import run_lock


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS])
def test_a_file_system_without_locks_goes_unlocked_in_a_note(tmp_path, monkeypatch, code):
    def no_locks(fd, operation):
        raise OSError(code, "no locks here")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said: list[str] = []
    assert run_lock.acquire(tmp_path, 5.0, said.append, "refused") is None
    assert said == [f"{tmp_path}'s file system takes no locks (no locks here): a second user of checkpoint.dir "
                    f"{tmp_path} would not be refused"]
