# SPDX-License-Identifier: GPL-2.0-or-later
"""debimage: the application guest's inputs, cache key and customisation."""

import hashlib
import os
import pathlib

import pytest

from curlingtool import debimage

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_big_file_is_deterministic() -> None:
    a = debimage.big_file_bytes(1 << 16)
    assert a == debimage.big_file_bytes(1 << 16)
    assert a != debimage.big_file_bytes(1 << 16, seed=1)
    assert len(a) == 1 << 16


def test_content_hash_follows_inputs(tmp_path: pathlib.Path) -> None:
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "etc" / "x.conf"
    conf.write_text("a\n")
    h1 = debimage.content_hash({"postgresql": "00"}, tmp_path)
    assert h1 == debimage.content_hash({"postgresql": "00"}, tmp_path)
    assert h1 != debimage.content_hash({"postgresql": "01"}, tmp_path)
    conf.write_text("b\n")
    assert h1 != debimage.content_hash({"postgresql": "00"}, tmp_path)
    assert len(h1) == 16


def test_overlay_is_in_the_repository() -> None:
    files = [str(p.relative_to(REPO / debimage.OVERLAY_DIR))
             for p in debimage.overlay_files(REPO / debimage.OVERLAY_DIR)]
    assert "etc/systemd/network/10-eth0.network" in files
    assert "etc/postgresql/15/main/pg_hba.conf" in files


def fake_root(root: pathlib.Path) -> None:
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/systemd-networkd.service").write_text("")
    (root / "etc/postgresql/15/main").mkdir(parents=True)
    (root / "etc/postgresql/15/main/postgresql.conf").write_text("")
    (root / "var/cache/apt/archives").mkdir(parents=True)
    (root / "var/cache/apt/archives/x.deb").write_text("")


def test_customize(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
                   ) -> None:
    monkeypatch.setattr(debimage, "BIG_FILE_SIZE", 4096)
    monkeypatch.setattr(debimage, "big_file_bytes",
                        lambda: b"x" * 4096)
    root = tmp_path / "root"
    fake_root(root)
    sha = debimage._customize(root, REPO / debimage.OVERLAY_DIR)
    assert sha == hashlib.sha256(b"x" * 4096).hexdigest()
    link = root / "etc/systemd/system/multi-user.target.wants" \
        / "systemd-networkd.service"
    assert os.readlink(link) == "/lib/systemd/system/systemd-networkd.service"
    assert os.readlink(root / "etc/systemd/system/apt-daily.timer") \
        == "/dev/null"
    assert "10.0.0.2/24" in (root / "etc/systemd/network/10-eth0.network"
                             ).read_text()
    assert not list((root / "var/cache/apt/archives").glob("*.deb"))
    # a second pass (a rebuild in the same tree) is harmless
    debimage._customize(root, REPO / debimage.OVERLAY_DIR)


def test_customize_refuses_a_tree_without_postgres(tmp_path: pathlib.Path
                                                   ) -> None:
    root = tmp_path / "root"
    fake_root(root)
    (root / "etc/postgresql/15/main/postgresql.conf").unlink()
    with pytest.raises(debimage.ImageError, match="PostgreSQL"):
        debimage._customize(root, REPO / debimage.OVERLAY_DIR)


def test_find_image_without_build(tmp_path: pathlib.Path) -> None:
    assert debimage.find_image(tmp_path) is None


def test_mounts_under(tmp_path: pathlib.Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        "90 1 0:5 / /b/r/proc rw - proc proc rw\n"
        "91 90 0:6 / /b/r/proc/sys/fs/binfmt_misc rw - autofs x rw\n"
        "92 1 0:7 / /b/rx rw - tmpfs t rw\n"
        "93 1 0:8 / /b/r/with\\040space rw - tmpfs t rw\n")
    assert debimage.mounts_under(pathlib.Path("/b/r"), str(info)) == [
        "/b/r/proc/sys/fs/binfmt_misc", "/b/r/with space", "/b/r/proc"]
