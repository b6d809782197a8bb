# SPDX-License-Identifier: GPL-2.0-or-later
"""patches/series parsing and rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from curlingtool.patchqueue import (SeriesError, parse_series, read_series,
                                    render_series, split_for_kind)

SERIES = """\
# Curling patch queue
# applied in this order

debian-ds/0001-pc-bios-skip-edk2-blobs.patch
debian-ds/0002-pc-bios-skip-dtb.patch   # Debian's +ds tarball only

   # ours
curling/0001-docs-devel-migration-add-Curling-design-document.patch
curling/0002-migration-add-curling.patch -p1
"""


def test_comments_blank_lines_and_topics() -> None:
    entries = parse_series(SERIES)
    assert [e.name for e in entries] == [
        "debian-ds/0001-pc-bios-skip-edk2-blobs.patch",
        "debian-ds/0002-pc-bios-skip-dtb.patch",
        "curling/0001-docs-devel-migration-add-Curling-design-document.patch",
        "curling/0002-migration-add-curling.patch",
    ]
    assert [e.topic for e in entries] == ["debian-ds", "debian-ds", "curling", "curling"]
    assert entries[0].lineno == 4


def test_topic_of_top_level_patch_is_empty() -> None:
    assert parse_series("0001-foo.patch\n")[0].topic == ""


def test_kind_topics_apply_only_to_their_kind() -> None:
    entries = parse_series(SERIES)
    applied, skipped = split_for_kind(entries, "tarball")
    assert [e.topic for e in applied] == ["curling", "curling"]
    assert len(skipped) == 2
    applied, skipped = split_for_kind(entries, "debian-ds")
    assert len(applied) == 4 and skipped == []


@pytest.mark.parametrize("text, message", [
    ("a.patch\na.patch\n", "listed twice"),
    ("../evil.patch\n", "bad patch path"),
    ("/etc/passwd\n", "bad patch path"),
])
def test_bad_series(text: str, message: str) -> None:
    with pytest.raises(SeriesError, match=message):
        parse_series(text)


def test_absent_and_empty_series(tmp_path: Path) -> None:
    assert read_series(tmp_path) == []
    (tmp_path / "series").write_text("")
    assert read_series(tmp_path) == []
    (tmp_path / "series").write_text("# nothing yet\n\n")
    assert read_series(tmp_path) == []


def test_render_keeps_comments_with_their_entries() -> None:
    old = [e.name for e in parse_series(SERIES)]
    renamed = {n: n for n in old}
    renamed["curling/0002-migration-add-curling.patch"] = "curling/0003-migration-add-curling.patch"
    new = old[:3] + ["curling/0002-migration-new.patch",
                     "curling/0003-migration-add-curling.patch"]
    text = render_series(SERIES, new, renamed)
    assert text == """\
# Curling patch queue
# applied in this order

debian-ds/0001-pc-bios-skip-edk2-blobs.patch
debian-ds/0002-pc-bios-skip-dtb.patch

   # ours
curling/0001-docs-devel-migration-add-Curling-design-document.patch
curling/0002-migration-new.patch
curling/0003-migration-add-curling.patch
"""
    assert [e.name for e in parse_series(text)] == new


def test_render_unchanged_is_identical_modulo_inline_comments() -> None:
    plain = "# header\n\na/1.patch\n\n# b\nb/2.patch\n# trailer\n"
    names = [e.name for e in parse_series(plain)]
    assert render_series(plain, names, {n: n for n in names}) == plain
