# SPDX-License-Identifier: GPL-2.0-or-later
"""The real patches/ directory: well-formed, and docs/curling.txt in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from curlingtool.patchqueue import parse_patch, read_series

REPO = Path(__file__).resolve().parents[2]
PATCHES = REPO / "patches"
DOC = REPO / "docs" / "curling.txt"
DOC_IN_TREE = "docs/devel/migration/curling.rst"

ENTRIES = read_series(PATCHES)


def _new_file(diff: bytes, path: str) -> bytes:
    """Content of a file that the diff creates, from its '+' lines."""
    m = re.search(rb"(?ms)^diff --git a/%s b/%s\n.*?^@@[^\n]*\n(.*?)(?=^diff --git |\Z)"
                  % (re.escape(path.encode()), re.escape(path.encode())), diff)
    assert m, f"the diff does not create {path}"
    lines = m.group(1).splitlines(keepends=True)
    assert all(ln.startswith(b"+") for ln in lines), f"{path} is not a new file"
    return b"".join(ln[1:] for ln in lines)


def _file_diff(diff: bytes, path: str) -> bytes:
    """The part of ``diff`` that changes ``path``."""
    m = re.search(rb"(?ms)^diff --git a/%s b/%s\n(.*?)(?=^diff --git |\Z)"
                  % (re.escape(path.encode()), re.escape(path.encode())), diff)
    assert m, f"the diff does not change {path}"
    return m.group(1)


def _apply_hunks(old: bytes, file_diff: bytes) -> bytes:
    """``old`` with the unified-diff hunks of ``file_diff`` applied; every
    context and removed line must match."""
    src = old.splitlines(keepends=True)
    out: list[bytes] = []
    pos = 0
    hunks = re.split(rb"(?m)^(@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@[^\n]*\n)",
                     file_diff)
    for header, body in zip(hunks[1::2], hunks[2::2]):
        start = int(re.match(rb"@@ -(\d+)", header).group(1))
        start = max(start - 1, 0) if b",0 " not in header.split(b"+")[0] \
            else start
        out += src[pos:start]
        pos = start
        for line in body.splitlines(keepends=True):
            if line.startswith(b"\\"):
                continue
            tag, text = line[:1], line[1:]
            if tag in (b" ", b"-"):
                assert src[pos] == text, f"hunk does not apply at line {pos + 1}"
                pos += 1
            if tag in (b" ", b"+"):
                out.append(text)
    out += src[pos:]
    return b"".join(out)


def test_series_lists_existing_patches() -> None:
    assert ENTRIES, "patches/series is empty"
    for entry in ENTRIES:
        assert (PATCHES / entry.name).is_file(), entry.name
    listed = {e.name for e in ENTRIES}
    on_disk = {str(p.relative_to(PATCHES)) for p in PATCHES.rglob("*.patch")}
    assert on_disk == listed, "patches on disk and in series differ"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_patch_is_well_formed(entry) -> None:
    patch = parse_patch((PATCHES / entry.name).read_bytes(), entry.name)
    assert len(patch.subject) <= 76, patch.subject
    assert re.match(r"^[\w./-]+(, [\w./-]+)*: \S", patch.subject), \
        f"subject is not 'subsystem: summary': {patch.subject!r}"
    assert not patch.subject.endswith("."), patch.subject
    assert f"Signed-off-by: {patch.author_name} <{patch.author_email}>" \
        in patch.message, "no Signed-off-by of the author"
    body = patch.message.split("\n", 1)[1] if "\n" in patch.message else ""
    assert len(body.replace("Signed-off-by:", "").split()) >= 10, \
        "the message must say why"


def test_docs_copy_matches_patch() -> None:
    """docs/curling.txt is the one source of the in-tree design document."""
    touches = f"diff --git a/{DOC_IN_TREE} b/{DOC_IN_TREE}\n".encode()
    docs = [e for e in ENTRIES if touches in (PATCHES / e.name).read_bytes()]
    assert docs, f"no patch touches {DOC_IN_TREE}"
    first = parse_patch((PATCHES / docs[0].name).read_bytes(), docs[0].name)
    in_tree = _new_file(first.diff, DOC_IN_TREE)
    for entry in docs[1:]:
        patch = parse_patch((PATCHES / entry.name).read_bytes(), entry.name)
        in_tree = _apply_hunks(in_tree, _file_diff(patch.diff, DOC_IN_TREE))
    assert in_tree == DOC.read_bytes(), \
        "docs/curling.txt differs from the design document the series builds"


def test_apply_hunks() -> None:
    old = b"a\nb\nc\nd\n"
    diff = (b"--- a/f\n+++ b/f\n@@ -1,2 +1,3 @@\n a\n+x\n b\n"
            b"@@ -4,1 +5,2 @@\n-d\n+e\n+f\n")
    assert _apply_hunks(old, diff) == b"a\nx\nb\nc\ne\nf\n"
