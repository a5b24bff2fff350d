"""Cache files that several processes, on one node or on several sharing a file system, may build at once.

Each builder writes its own temporary file, named by host, process and a random
part (container processes of different nodes often have the same pid), and
then publishes it under the final name only if no one has yet: a hard link,
which fails when the name exists. A file already published is never replaced,
because another process may have it memory-mapped (on NFS, a mapped file
replaced under a reader can fault it: SIGBUS), and same key, same content.
Where the file system has no hard links, the temporary file is renamed over
the name instead (atomic: nobody reads half a file).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path


def write_once(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), then publish tmp as `path` unless it exists. A write that fails or is interrupted (Ctrl-C while
    a large corpus is tokenized) leaves no file behind."""
    tmp = path.with_name(f"{path.stem}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process published the same content first: keep theirs, which may be mapped already
        except OSError:  # no hard links here (some network and FUSE file systems)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
