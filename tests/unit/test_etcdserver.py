# SPDX-License-Identifier: GPL-2.0-or-later
"""The throw-away etcd of the tests, with stand-in binaries (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from curlingtool.etcdserver import EtcdFailed, EtcdMissing, EtcdServer


def fake_etcd(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "bin" / "etcd"
    script.parent.mkdir(exist_ok=True)
    script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args"\n{body}\n')
    script.chmod(0o755)
    return script


def test_missing_binary() -> None:
    server = EtcdServer("/nonexistent", binary="curling-no-such-etcd")
    with pytest.raises(EtcdMissing, match="install the Debian package "
                       "etcd-server"):
        with server:
            pass


def test_loopback_urls_and_spec(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path)
    assert server.url.startswith("http://127.0.0.1:")
    assert server.peer_url.startswith("http://127.0.0.1:")
    assert server.url != server.peer_url
    assert server.spec == f"etcd:{server.url}"
    args = server.args("etcd")
    assert args[args.index("--listen-client-urls") + 1] == server.url
    assert args[args.index("--advertise-client-urls") + 1] == server.url
    assert args[args.index("--listen-peer-urls") + 1] == server.peer_url
    assert args[args.index("--data-dir") + 1] == str(tmp_path / "etcd-data")


def test_etcd_that_exits_is_reported(tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EtcdServer, "RETRY_DELAY", 0.01)
    binary = fake_etcd(tmp_path, f'echo start >> "{tmp_path}/starts"\n'
                       'echo "bind: address already in use"; exit 1')
    server = EtcdServer(tmp_path, binary=str(binary))
    with pytest.raises(EtcdFailed, match="exited with 1 before it was "
                       "healthy: bind: address already in use"):
        server.start()
    assert not server.running()
    # tried again, then gave up
    assert (tmp_path / "starts").read_text().split() == ["start"] * 3
    assert f"--listen-client-urls {server.url}" in (tmp_path / "args").read_text()


def test_etcd_that_exits_once_is_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart right after a kill may find a port still taken for a
    moment: the next attempt brings etcd back."""
    monkeypatch.setattr(EtcdServer, "RETRY_DELAY", 0.01)
    up = tmp_path / "up"
    binary = fake_etcd(tmp_path, f'if [ -e "{tmp_path}/failed" ]; then '
                       f'touch "{up}"; exec sleep 60; fi\n'
                       f'touch "{tmp_path}/failed"; exit 1')
    monkeypatch.setattr(EtcdServer, "_healthy", lambda self: up.exists())
    with EtcdServer(tmp_path, binary=str(binary)) as server:
        assert server.running()
    assert not server.running()


def test_etcd_never_healthy_is_killed(tmp_path: Path) -> None:
    binary = fake_etcd(tmp_path, "exec sleep 60")
    server = EtcdServer(tmp_path, binary=str(binary), timeout=0.3)
    with pytest.raises(EtcdFailed, match="not healthy on http://127.0.0.1:"):
        with server:
            pass
    assert not server.running()


def test_leaving_the_block_kills_it(tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    binary = fake_etcd(tmp_path, "exec sleep 60")
    server = EtcdServer(tmp_path, binary=str(binary))
    monkeypatch.setattr(EtcdServer, "_healthy", lambda self: True)
    with pytest.raises(RuntimeError):
        with server:
            assert server.running()
            url = server.url
            server.stop()
            assert not server.running()
            server.start()   # same ports, same data
            assert server.running() and server.url == url
            raise RuntimeError("test failed")
    assert not server.running()
