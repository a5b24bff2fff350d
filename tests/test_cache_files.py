"""Cache files built by several processes at once (`mpoe.train.data.cache_files.write_once`)."""

import errno
import os
import threading

from mpoe.train.data.cache_files import write_once


def test_a_published_file_is_never_replaced(tmp_path):
    """Another process may have it memory-mapped: the same key's second build leaves it, inode and all."""
    path = tmp_path / "tokens.bin"
    write_once(path, lambda tmp: tmp.write_bytes(b"first"))
    inode = path.stat().st_ino
    write_once(path, lambda tmp: tmp.write_bytes(b"second"))
    assert path.read_bytes() == b"first" and path.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.bin"]


def test_builders_with_the_same_pid_and_host_do_not_share_a_temporary_file(tmp_path):
    """Threads share a pid, as container processes on different nodes often do: each writes its own file."""
    path, started, other_done = tmp_path / "tokens.bin", threading.Event(), threading.Event()

    def slow(tmp):
        with open(tmp, "wb") as f:
            f.write(b"slow-")
            started.set()
            other_done.wait(10)
            f.write(b"whole")

    builder = threading.Thread(target=write_once, args=(path, slow))
    builder.start()
    started.wait(10)
    write_once(path, lambda tmp: tmp.write_bytes(b"FAST-DATA!"))
    other_done.set()
    builder.join()
    assert path.read_bytes() == b"FAST-DATA!"  # published whole, first; the slow one never writes into it
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.bin"]


def test_without_hard_links_the_file_is_renamed_into_place(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "tokens.bin"
    write_once(path, lambda tmp: tmp.write_bytes(b"data"))
    assert path.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == ["tokens.bin"]
