"""Files under the data directory: written whole or not at all, and known by their SHA-256.

Every file or folder Homefire writes where a reader may look (a key, a picture, a bundle, a
backup, the adapter in use, a checkpoint) is written at a hidden partial path beside it and
renamed into place in one step, so a reader sees the old one or the new one, never half of
either, and a crash leaves only a `.partial` that the next start or backup ignores.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

CHUNK = 1 << 20


@contextmanager
def written_whole(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A hidden partial path beside `path` to write a file or a folder at. When the block ends
    it takes `path`'s place in one rename; when the block raises it is removed. With `mode`,
    the partial file is created empty with that mode first, so it is never readable by others,
    not even for a moment."""
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    if mode is not None:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise


def write_whole(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace the file at `path` with `data` in one step (see written_whole)."""
    with written_whole(path, mode) as partial:
        if isinstance(data, bytes):
            partial.write_bytes(data)
        else:
            partial.write_text(data)


def feed(digest, source: IO[bytes], out: IO[bytes] | None = None,
         each: Callable[[int], None] | None = None) -> None:
    """Read `source` to its end into `digest` (a hashlib object), copying each block to `out`
    and telling `each` its size, a block of CHUNK bytes at a time."""
    while block := source.read(CHUNK):
        digest.update(block)
        if out is not None:
            out.write(block)
        if each is not None:
            each(len(block))


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex, read a block at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        feed(digest, source)
    return digest.hexdigest()
