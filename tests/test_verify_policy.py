"""verify's Policy: the one place that says how checking an archive of ours differs from
checking any bag (`--bag-only`); the checker asks it, field by field."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from archived.verify import ANY_BAG, ARCHIVE, verify_path

SEVEN_ZIP = b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(600)


def test_archive_and_any_bag_differ_in_every_field() -> None:
    same = [f.name for f in fields(ARCHIVE) if getattr(ARCHIVE, f.name) == getattr(ANY_BAG, f.name)]
    assert same == []


def test_bag_only_is_any_bag(tmp_path: Path) -> None:
    path = tmp_path / "bag.7z"
    path.write_bytes(SEVEN_ZIP)
    assert verify_path(path, keys=[], bag_only=True) == verify_path(path, keys=[], policy=ANY_BAG)
    assert verify_path(path, keys=[]) == verify_path(path, keys=[], policy=ARCHIVE)


def test_a_policy_is_asked_not_which_one_it_is(tmp_path: Path) -> None:
    path = tmp_path / "bag.7z"
    path.write_bytes(SEVEN_ZIP)
    strict = replace(ANY_BAG, unread_format_unverifiable=False)
    assert verify_path(path, keys=[], policy=ANY_BAG).verdict == "unverifiable"
    assert verify_path(path, keys=[], policy=strict).verdict == "invalid"
