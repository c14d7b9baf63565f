"""Opening an export safely: zip archives checked before anything is read, JSON streamed.

Nothing is extracted to disk: the one member an importer needs is read as a stream from
the archive. Every error names the file (`export.zip!conversations.json` for a member)
and, for malformed JSON, the byte position.
"""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

import ijson

# Generous for real exports (hundreds of MB), small next to a zip bomb's gigabytes.
MAX_UNCOMPRESSED = 4 << 30
MAX_RATIO = 200          # text JSON compresses 5-20x; a bomb, 1000x and more
RATIO_FLOOR = 1 << 20    # tiny members may compress oddly well; judge only bigger ones
CHUNK = 1 << 16


class ImportFailed(ValueError):
    """A file that cannot be imported; the message names the file and where."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


@dataclass
class Member:
    """One readable thing: a plain file, or one member of a checked zip archive."""

    label: str        # for messages: `path` or `path!member`
    name: str         # the file or member name, for format detection
    size: int         # bytes once uncompressed
    open: object      # () -> binary stream
    done: int = 0     # bytes read so far, for progress


def check_archive(archive: zipfile.ZipFile, label: str) -> None:
    """Refuse links, paths that leave the archive, names given twice, and zip bombs, before
    reading a byte."""
    total, seen = 0, set()
    for info in archive.infolist():
        name = info.filename
        if name in seen:   # which copy a reader gets depends on the reader: refuse both
            raise ImportFailed(label, f"member {name!r} appears twice; refusing the whole archive")
        seen.add(name)
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
            raise ImportFailed(label, f"member {name!r} points outside the archive; refusing "
                                      "the whole archive (a zip-slip attack or a broken tool)")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ImportFailed(label, f"member {name!r} is a symbolic link; exports contain none, "
                                      "so the archive is refused")
        total += info.file_size
        if total > MAX_UNCOMPRESSED:
            raise ImportFailed(label, f"uncompressed size exceeds {MAX_UNCOMPRESSED >> 30} GiB; "
                                      "refusing a possible zip bomb")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR and ratio > MAX_RATIO:
            raise ImportFailed(label, f"member {name!r} expands {ratio:.0f}x (limit {MAX_RATIO}x); "
                                      "refusing a possible zip bomb")


@contextmanager
def members(path: str, label: str | None = None) -> Iterator[list[Member]]:
    """The readable members of `path`: itself, or the files of a zip archive once checked.

    `label` names the file in messages (an upload's original name, not its spool file).
    """
    try:
        file = open(path, "rb")
    except OSError as err:
        raise ImportFailed(label or path, err.strerror or str(err)) from err
    path = label or path
    with file:
        magic = file.read(4)
        if magic[:2] != b"PK":
            file.seek(0, io.SEEK_END)
            size = file.tell()
            file.seek(0)
            yield [Member(path, path, size, lambda: io.BufferedReader(_Unclosable(file), CHUNK))]
            return
        try:
            archive = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise ImportFailed(path, f"a zip archive that cannot be read ({err}): it is probably "
                                     "truncated; download the export again") from err
        with archive:
            check_archive(archive, path)
            found = [Member(f"{path}!{info.filename}", info.filename, info.file_size,
                            lambda info=info: archive.open(info))
                     for info in archive.infolist() if not info.is_dir()]
            yield found


class _Unclosable(io.RawIOBase):
    """Lets a parser 'close' the shared file handle without closing it."""

    def __init__(self, file: IO[bytes]):
        file.seek(0)
        self._file = file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)


class Counting:
    """A binary reader that knows where each chunk it handed out began."""

    def __init__(self, raw: IO[bytes], member: Member):
        self.raw, self.member, self.label = raw, member, member.label
        self.offset = 0          # bytes handed out so far
        self.chunk_start = 0     # where the latest chunk began
        self.chunk = b""
        self.lines_before = 0    # newlines before the latest chunk

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
            raise ImportFailed(self.label, f"the archive is damaged or truncated near byte "
                                           f"{self.offset} of this member ({err})") from err
        self.lines_before += self.chunk.count(b"\n")
        self.chunk_start, self.chunk = self.offset, data
        self.offset += len(data)
        self.member.done = self.offset
        return data

    def place(self, position: int) -> str:
        """'byte N (line L, column C)' for a position within the latest chunk."""
        head = self.chunk[:position - self.chunk_start]
        line = self.lines_before + head.count(b"\n") + 1
        column = len(head) - (head.rfind(b"\n") + 1) + 1
        return f"byte {position} (line {line}, column {column})"


def json_items(member: Member, prefix: str) -> Iterator[object]:
    """Stream the JSON values at `prefix` (ijson syntax, e.g. 'item'); bounded memory."""
    with member.open() as raw:
        reader = Counting(raw, member)
        try:
            yield from ijson.items(reader, prefix, use_float=True, buf_size=CHUNK)
        except ijson.JSONError as err:
            raise ImportFailed(member.label, json_error(err, reader)) from None


def json_error(err: Exception, reader: Counting) -> str:
    """Where yajl stopped, in bytes from the start of the file, and what it saw there."""
    lines = str(err).splitlines()
    what = lines[0] if lines else str(err)
    if "premature EOF" in what or "Incomplete JSON" in what:
        return f"the JSON ends early at byte {reader.offset}: the file is truncated"
    # yajl prints up to 30 bytes either side of the error, the error byte at column 40 of
    # its second line (after 10 spaces of padding, more near the start of its buffer, which
    # is our latest chunk; newlines shown as spaces). Find that context in the chunk.
    position = reader.chunk_start
    line = lines[1] if len(lines) >= 2 else ""
    haystack = reader.chunk.replace(b"\n", b" ").replace(b"\r", b" ")
    if len(line) >= 40 and line.startswith(" " * 10):
        found = haystack.find(line[10:].encode())
        if found >= 0:
            position = reader.chunk_start + found + 30
        else:  # the error lies within 30 bytes of the chunk's start
            for pad in range(10, 41):
                if haystack.startswith(line[pad:].encode()):
                    position = reader.chunk_start + 40 - pad
                    break
                if line[pad] != " ":
                    break
    near = line[20:60].strip()
    return (f"invalid JSON near {reader.place(position)}: {what.split(': ', 1)[-1]}"
            + (f" (near {near!r})" if near else ""))
