"""Atomic file writes: write to a temporary file in the target's folder, then ``os.replace`` it.

A reader (or a crashed writer) never sees a half-written file: the target either keeps its old content or
has the complete new one. The temporary file lives in the same folder so the rename stays on one
filesystem (``os.replace`` is atomic only there).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp creates files readable only by their owner; give the final file the permissions a plain
# open() would (0o666 minus the process umask, read once at import since os.umask can only be set).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, on error delete it.

    The temporary name keeps the target's suffix, so writers that pick a format by extension (gemmi,
    starfile) still do the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload, indent: int = 2) -> Path:
    """Write ``payload`` as JSON to ``path`` through a temporary file and a rename."""
    return write_text_atomic(path, json.dumps(payload, indent=indent))
