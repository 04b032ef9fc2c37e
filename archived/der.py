"""Just enough DER to read what rfc3161-client does not show, and to sort a SET OF.

Definite lengths, low tag numbers: what DER allows. Nothing here builds ASN.1 from
values; callers walk a structure they know and copy bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENCE, SET, OID, OCTET_STRING = 0x30, 0x31, 0x06, 0x04


class DerError(ValueError):
    """The bytes are not the DER the caller expected."""


@dataclass(frozen=True)
class Tlv:
    tag: int
    start: int  # of the header
    body: int  # of the contents
    end: int  # one past the contents

    def raw(self, data: bytes) -> bytes:
        """Header and contents."""
        return data[self.start : self.end]

    def value(self, data: bytes) -> bytes:
        return data[self.body : self.end]


def read(data: bytes, pos: int = 0, end: int | None = None) -> Tlv:
    """The element that starts at `pos` (and must end by `end`)."""
    end = len(data) if end is None else end
    if pos + 2 > end:
        raise DerError(f"truncated at byte {pos}")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise DerError(f"high tag number at byte {pos}")
    body = pos + 2
    length = first
    if first & 0x80:
        count = first & 0x7F
        if not 0 < count <= 4 or body + count > end:
            raise DerError(f"bad length at byte {pos}")
        length = int.from_bytes(data[body : body + count], "big")
        body += count
    if body + length > end:
        raise DerError(f"element at byte {pos} runs past its container")
    return Tlv(tag, pos, body, body + length)


def children(data: bytes, parent: Tlv) -> list[Tlv]:
    """The elements inside a constructed element, in order."""
    found, pos = [], parent.body
    while pos < parent.end:
        child = read(data, pos, parent.end)
        found.append(child)
        pos = child.end
    return found


def first(data: bytes, parent: Tlv) -> Tlv:
    """The first element inside `parent`."""
    if parent.body >= parent.end:
        raise DerError(f"empty element at byte {parent.start}")
    return read(data, parent.body, parent.end)


def expect(element: Tlv, tag: int, what: str) -> Tlv:
    if element.tag != tag:
        raise DerError(f"{what}: tag 0x{element.tag:02x}, expected 0x{tag:02x}")
    return element


def oid(data: bytes, element: Tlv) -> str:
    """An OBJECT IDENTIFIER in dotted form."""
    raw = expect(element, OID, "object identifier").value(data)
    if not raw:
        raise DerError("empty object identifier")
    arcs, value = [], 0
    for byte in raw:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def sorted_set(data: bytes, element: Tlv) -> bytes:
    """`data` with the members of the SET OF `element` in DER order (X.690 11.6: as octet
    strings, ascending). Same length: only the members' order changes."""
    members = sorted(child.raw(data) for child in children(data, element))
    return data[: element.body] + b"".join(members) + data[element.end :]
