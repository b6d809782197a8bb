# SPDX-License-Identifier: GPL-2.0-or-later
"""apply -> export round trip, incremental apply, patch errors."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pygit2
import pytest

from conftest import TOP, PatchMaker, git
from curlingtool import patchqueue, source
from curlingtool.patchqueue import PatchApplyError, PatchQueue, TreeStateError

LONG_SUBJECT = ("migration/ram: a deliberately long subject line that git "
                "format-patch has to fold over two header lines")


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def tree_mtimes(tree: Path) -> dict[str, int]:
    return {str(p.relative_to(tree)): p.lstat().st_mtime_ns
            for p in tree.rglob("*") if ".git" not in p.parts and not p.is_dir()}


def install(files: list[Path], patches: Path, topic: str,
            series: list[str] | None = None) -> list[str]:
    names = []
    for f in files:
        (patches / topic).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, patches / topic / f.name)
        names.append(f"{topic}/{f.name}")
    lines = (series or []) + names
    (patches / "series").write_text("# Curling patch queue\n\n"
                                    + "".join(f"{n}\n" for n in lines))
    return names


@pytest.fixture
def two_patches(tmp_path: Path, make_patches: PatchMaker) -> Path:
    files = make_patches([
        ("Ann Author <ann@example.org>",
         "migration: add line61\n\nWhy: to test.\n\nSigned-off-by: Ann Author <ann@example.org>",
         {"migration/migration.c": b"".join(b"int line%d;\n" % i for i in range(62)),
          "migration/curling.c": b"/* SPDX-License-Identifier: GPL-2.0-or-later */\n"}),
        ("J\u00f6rg M\u00fcller <jm@example.org>",
         f"{LONG_SUBJECT}\n\nBody line one.\n\nSigned-off-by: J\u00f6rg M\u00fcller <jm@example.org>",
         {"migration/ram.c": b"".join(b"static int ram%d;\n" % i for i in range(41))}),
    ], tmp_path / "fp")
    patches = tmp_path / "patches"
    install(files, patches, "curling")
    return patches


def test_round_trip_is_a_noop(tmp_path: Path, two_patches: Path,
                              upstream_source: source.Source) -> None:
    queue = PatchQueue(two_patches, tmp_path / "qemu")
    result = queue.apply(upstream_source)
    assert result.changed and len(result.applied) == 2
    tree = tmp_path / "qemu"
    assert (tree / "migration/curling.c").is_file()
    assert os.access(tree / "configure", os.X_OK)
    assert os.readlink(tree / "scripts/link-to-configure") == "../configure"

    repo = pygit2.Repository(str(tree))
    head = repo.head.peel(pygit2.Commit)
    assert head.author.name == "J\u00f6rg M\u00fcller"
    assert head.author.offset == 60
    assert head.message.startswith(LONG_SUBJECT + "\n\nBody line one.\n")
    upstream = head.parents[0].parents[0]
    assert upstream.message.startswith(f"Import upstream QEMU 10.2.2 (tarball)")

    before = snapshot(two_patches)
    assert not queue.export().changed
    assert snapshot(two_patches) == before


def test_second_apply_does_nothing(tmp_path: Path, two_patches: Path,
                                   upstream_source: source.Source) -> None:
    queue = PatchQueue(two_patches, tmp_path / "qemu")
    queue.apply(upstream_source)
    mtimes = tree_mtimes(tmp_path / "qemu")
    result = queue.apply(upstream_source)
    assert not result.changed
    assert tree_mtimes(tmp_path / "qemu") == mtimes


def series_names(patches: Path) -> list[str]:
    return [e.name for e in patchqueue.read_series(patches)]


def test_added_patch_rewrites_only_its_files(
        tmp_path: Path, two_patches: Path, upstream_source: source.Source,
        make_patches: PatchMaker) -> None:
    tree = tmp_path / "qemu"
    queue = PatchQueue(two_patches, tree)
    queue.apply(upstream_source)
    mtimes = tree_mtimes(tree)
    files = make_patches([("Ann Author <ann@example.org>", "docs: mention Curling",
                           {"README.rst": b"QEMU\n====\n\nNow with Curling.\n"})],
                         tmp_path / "fp3")
    target = two_patches / "curling" / "0003-docs-mention-Curling.patch"
    shutil.copy(files[0], target)
    with open(two_patches / "series", "a") as f:
        f.write("curling/0003-docs-mention-Curling.patch\n")
    assert queue.apply(upstream_source).changed
    after = tree_mtimes(tree)
    assert {p for p in after if after[p] != mtimes.get(p)} == {"README.rst"}


def test_changed_patch_rewrites_only_changed_files(
        tmp_path: Path, two_patches: Path, upstream_source: source.Source) -> None:
    tree = tmp_path / "qemu"
    queue = PatchQueue(two_patches, tree)
    queue.apply(upstream_source)
    first_commit = queue.load_state()["patches"][0]["commit"]
    mtimes = tree_mtimes(tree)
    second = two_patches / series_names(two_patches)[1]
    second.write_text(second.read_text().replace("+static int ram40;",
                                                 "+static int ram40_changed;"))
    assert queue.apply(upstream_source).changed
    assert queue.load_state()["patches"][0]["commit"] == first_commit
    after = tree_mtimes(tree)
    assert {p for p in after if after[p] != mtimes.get(p)} == {"migration/ram.c"}
    assert b"ram40_changed" in (tree / "migration/ram.c").read_bytes()


def test_unexported_commit_is_not_thrown_away(
        tmp_path: Path, two_patches: Path, upstream_source: source.Source) -> None:
    tree = tmp_path / "qemu"
    queue = PatchQueue(two_patches, tree)
    queue.apply(upstream_source)
    (tree / "README.rst").write_text("edited\n")
    git(tree, "commit", "-q", "-a", "-m", "docs: edit README")
    with pytest.raises(TreeStateError, match="export"):
        queue.apply(upstream_source)
    # export, then apply has nothing to do
    assert queue.export().written == ["curling/0003-docs-edit-README.patch"]
    assert not queue.apply(upstream_source).changed


def test_uncommitted_change_is_not_thrown_away(
        tmp_path: Path, two_patches: Path, upstream_source: source.Source) -> None:
    tree = tmp_path / "qemu"
    queue = PatchQueue(two_patches, tree)
    queue.apply(upstream_source)
    (tree / "migration/ram.c").write_text("edited\n")
    second = two_patches / series_names(two_patches)[1]
    second.write_text(second.read_text().replace("+static int ram40;", "+int y;"))
    with pytest.raises(TreeStateError, match="uncommitted changes in 1 file"):
        queue.apply(upstream_source)
    queue.apply(upstream_source, force=True)
    assert b"int y;" in (tree / "migration/ram.c").read_bytes()


def test_export_writes_new_commit_and_keeps_comments(
        tmp_path: Path, two_patches: Path, upstream_source: source.Source) -> None:
    tree = tmp_path / "qemu"
    queue = PatchQueue(two_patches, tree)
    queue.apply(upstream_source)
    (tree / "README.rst").write_text("edited\n")
    git(tree, "commit", "-q", "-a", "-m", "docs: edit README\n\nSigned-off-by: A <a@b>")
    result = queue.export()
    assert result.written == ["curling/0003-docs-edit-README.patch"]
    series = (two_patches / "series").read_text()
    assert series.startswith("# Curling patch queue\n\n")
    assert series.splitlines()[-1] == "curling/0003-docs-edit-README.patch"
    assert not queue.export().changed


def test_new_commit_joins_the_topic_of_the_commit_before_it(
        tmp_path: Path, upstream_source: source.Source,
        make_patches: PatchMaker) -> None:
    files = make_patches([
        ("Ann Author <ann@example.org>", "migration: a fix\n\nSigned-off-by: A <a@b>",
         {"migration/migration.c": b"int fixed;\n"}),
        ("Ann Author <ann@example.org>", "migration: a feature\n\nSigned-off-by: A <a@b>",
         {"migration/curling.c": b"int feature;\n"}),
    ], tmp_path / "fp")
    patches = tmp_path / "patches"
    install(files[:1], patches, "fixes")
    install(files[1:], patches, "curling",
            series=["fixes/0001-migration-a-fix.patch"])
    tree = tmp_path / "qemu"
    queue = PatchQueue(patches, tree)
    queue.apply(upstream_source)
    # a second fix, put right after the first one
    feature = git(tree, "rev-parse", "HEAD").strip()
    git(tree, "reset", "-q", "--hard", "HEAD~1")
    (tree / "README.rst").write_text("fixed too\n")
    git(tree, "commit", "-q", "-a", "-m", "docs: another fix\n\nSigned-off-by: A <a@b>")
    git(tree, "cherry-pick", feature)
    (tree / "VERSION").write_text("10.2.2-feature\n")
    git(tree, "commit", "-q", "-a", "-m", "version: after the feature\n\nSigned-off-by: A <a@b>")
    result = queue.export()
    # (the feature's patch names its new commit)
    assert sorted(result.written) == ["curling/0001-migration-a-feature.patch",
                                      "curling/0002-version-after-the-feature.patch",
                                      "fixes/0002-docs-another-fix.patch"]
    assert series_names(patches) == ["fixes/0001-migration-a-fix.patch",
                                     "fixes/0002-docs-another-fix.patch",
                                     "curling/0001-migration-a-feature.patch",
                                     "curling/0002-version-after-the-feature.patch"]


def test_debian_topic_skipped_for_other_kinds_and_kept_on_export(
        tmp_path: Path, two_patches: Path, upstream_source: source.Source,
        make_patches: PatchMaker) -> None:
    debian = make_patches([("Ann Author <ann@example.org>",
                            "pc-bios: do not build dtb",
                            {"pc-bios/meson.build": b"roms = []\n"})], tmp_path / "fpd")
    (two_patches / "debian-ds").mkdir()
    shutil.copy(debian[0], two_patches / "debian-ds" / "0001-pc-bios-do-not-build-dtb.patch")
    series = two_patches / "series"
    series.write_text("debian-ds/0001-pc-bios-do-not-build-dtb.patch\n"
                      + series.read_text())
    queue = PatchQueue(two_patches, tmp_path / "qemu")
    result = queue.apply(upstream_source)
    assert result.skipped == ["debian-ds/0001-pc-bios-do-not-build-dtb.patch"]
    assert b"dtb" in (tmp_path / "qemu/pc-bios/meson.build").read_bytes()
    before = snapshot(two_patches)
    assert not queue.export().changed
    assert snapshot(two_patches) == before


def test_patch_that_does_not_apply_names_patch_file_and_hunk(
        tmp_path: Path, two_patches: Path, upstream_source: source.Source,
        make_patches: PatchMaker) -> None:
    files = make_patches([("Ann Author <ann@example.org>", "ram: change ram30",
                           {"migration/ram.c": b"".join(
                               b"static int ram%d;\n" % i if i != 30 else b"int x;\n"
                               for i in range(41))})], tmp_path / "fpx")
    # make the hunk's context wrong
    bad = files[0].read_text().replace(" static int ram28;", " static int WRONG;")
    (two_patches / "curling" / "0003-ram-change-ram30.patch").write_text(bad)
    with open(two_patches / "series", "a") as f:
        f.write("curling/0003-ram-change-ram30.patch\n")
    queue = PatchQueue(two_patches, tmp_path / "qemu")
    with pytest.raises(PatchApplyError) as info:
        queue.apply(upstream_source)
    err = info.value
    assert err.patch == "curling/0003-ram-change-ram30.patch"
    assert err.path == "migration/ram.c"
    assert err.hunk is not None and err.hunk.startswith("hunk #1 @@ -")
    assert "curling/0003-ram-change-ram30.patch" in str(err)
    assert "migration/ram.c" in str(err)


def test_missing_patch_file_is_reported(tmp_path: Path,
                                        upstream_source: source.Source) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "series").write_text("curling/0001-nope.patch\n")
    with pytest.raises(patchqueue.SeriesError, match="0001-nope.patch"):
        PatchQueue(patches, tmp_path / "qemu").apply(upstream_source)


@pytest.mark.parametrize("series", [None, "", "# only a comment\n\n"])
def test_absent_or_empty_series_gives_pristine_tree(
        tmp_path: Path, upstream_source: source.Source, series: str | None) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    if series is not None:
        (patches / "series").write_text(series)
    queue = PatchQueue(patches, tmp_path / "qemu")
    result = queue.apply(upstream_source)
    assert result.applied == []
    assert (tmp_path / "qemu/VERSION").read_text() == "10.2.2\n"
    assert not queue.export().changed


def test_parse_patch_headers(tmp_path: Path, make_patches: PatchMaker) -> None:
    files = make_patches([("J\u00f6rg M\u00fcller <jm@example.org>",
                           f"{LONG_SUBJECT}\n\nBody.",
                           {"README.rst": b"x\n"})], tmp_path / "fpp")
    patch = patchqueue.parse_patch(files[0].read_bytes(), files[0].name)
    assert patch.author_name == "J\u00f6rg M\u00fcller"
    assert patch.author_email == "jm@example.org"
    assert patch.subject == LONG_SUBJECT
    assert patch.message == f"{LONG_SUBJECT}\n\nBody.\n"
    assert patch.offset == 60
    assert patch.diff.startswith(b"diff --git a/README.rst b/README.rst\n")


def test_import_ignores_foreign_owners(tmp_path: Path,
                                       upstream_source: source.Source) -> None:
    patches = tmp_path / "patches"
    PatchQueue(patches, tmp_path / "qemu").apply(upstream_source)
    st = (tmp_path / "qemu" / "VERSION").stat()
    assert st.st_uid == os.getuid()
    assert TOP not in os.listdir(tmp_path / "qemu")


def test_bisect_steps_visit_each_patch_and_return_to_the_branch(
        tmp_path: Path, two_patches: Path,
        upstream_source: source.Source) -> None:
    tree = tmp_path / "qemu"
    queue = PatchQueue(two_patches, tree)
    queue.apply(upstream_source)
    _repo, _upstream, commits = queue.commits()
    head_before = pygit2.Repository(str(tree)).head.target
    seen = []
    with contextlib.closing(queue.bisect_steps(commits)) as steps:
        for commit in steps:
            repo = pygit2.Repository(str(tree))
            assert repo.head_is_detached and repo.head.target == commit.id
            seen.append((commit.id, b"ram40" in (tree / "migration/ram.c").read_bytes()))
    assert [c for c, _ in seen] == [c.id for c in commits]
    # the second patch's change is in the tree only at the second step
    assert [second for _, second in seen] == [False, True]
    repo = pygit2.Repository(str(tree))
    assert not repo.head_is_detached and repo.head.target == head_before
    assert not repo.status()


def test_bisect_builds_a_source_kinds_fixups_only_together() -> None:
    entries = patchqueue.parse_series(
        "debian-ds/0001-a.patch\ndebian-ds/0002-b.patch\n"
        "curling/0001-c.patch\ncurling/0002-d.patch\n")
    assert patchqueue.bisect_build_points(entries, "debian-ds") == \
        [False, True, True, True]
    assert patchqueue.bisect_build_points(entries, "tarball") == [True, True]
