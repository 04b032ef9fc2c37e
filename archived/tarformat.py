"""The tar format as the archive writes it: 512-byte blocks, regular file members with
a ustar (or PAX) header, padding to a block, and two zero blocks at the end.

Fragments written with these concatenate into one tar: none of them carries `END`
but the last.
"""

from __future__ import annotations

import tarfile

BLOCK = 512  # a tar block
END = bytes(2 * BLOCK)  # a tar ends with two zero blocks
_ZERO_BLOCK = bytes(BLOCK)


def padding(size: int) -> bytes:
    """The zeros that fill a tar member's data up to a whole block."""
    return _ZERO_BLOCK[: -size % BLOCK]


_USTAR_TAIL = (
    b"0"  # regular file
    + bytes(100)  # link name
    + b"ustar\x0000"
    + bytes(64)  # user and group name: none
    + bytes(16)  # device numbers: none, as tarfile writes them for a regular file
    + bytes(155 + 12)  # name prefix, padding
)
_USTAR_FIXED = b"0000644\x00" + b"0000000\x00" * 2  # mode, uid, gid
_USTAR_SUM = sum(_USTAR_TAIL) + 8 * 32  # the checksum field counts as eight spaces
_USTAR_MAX = 8**11  # size and mtime fields hold 11 octal digits


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """The header block(s) of a regular file member: mode 0644, no owner.

    A short ASCII name gets a plain ustar header, built here because `tarfile` takes
    15 us a header (a third of the time per small file); anything else, such as a
    long or non-ASCII name or an 8 GiB file, the PAX header `tarfile` writes.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 100 and raw.isascii() and 0 <= size < _USTAR_MAX and 0 <= mtime < _USTAR_MAX:
        head = raw.ljust(100, b"\x00") + _USTAR_FIXED + b"%011o\x00%011o\x00" % (size, mtime)
        checksum = sum(head) + _USTAR_SUM
        return head + b"%06o\x00 " % checksum + _USTAR_TAIL
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
