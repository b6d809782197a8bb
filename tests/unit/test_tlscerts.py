# SPDX-License-Identifier: GPL-2.0-or-later
"""The TLS tests' certificates, made and checked with GnuTLS's certtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from curlingtool import tlscerts

needs_certtool = pytest.mark.skipif(shutil.which("certtool") is None,
                                    reason="certtool is not installed")


def verify(ca: Path, cert: Path) -> str:
    proc = subprocess.run(["certtool", "--verify", "--load-ca-certificate",
                           str(ca), "--infile", str(cert)],
                          capture_output=True, text=True, check=False)
    return proc.stdout + proc.stderr


def info(cert: Path) -> str:
    return subprocess.run(["certtool", "-i", "--infile", str(cert)],
                          capture_output=True, text=True,
                          check=True).stdout


def test_missing_certtool(monkeypatch: pytest.MonkeyPatch,
                          tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(tlscerts.TlsToolMissing, match="gnutls-bin"):
        tlscerts.Pki.create(tmp_path)


def test_qemu_objects(tmp_path: Path) -> None:
    assert tlscerts.creds_object("tls0", tmp_path, "server") == (
        f"tls-creds-x509,id=tls0,dir={tmp_path},endpoint=server,"
        "verify-peer=on")
    assert tlscerts.authz_object("authz0", "curling-sender") == \
        "authz-simple,id=authz0,identity=CN=curling-sender"


def test_qemu_args_by_role(tmp_path: Path) -> None:
    pki = tlscerts.Pki(tmp_path, tlscerts.Authority(tmp_path / "ca"),
                       tmp_path / "r", tmp_path / "s")
    authz = tlscerts.authz_object("authz0", tlscerts.SENDER_CN)
    assert pki.qemu_args("receiver") == [
        "-object", tlscerts.creds_object("tls0", tmp_path / "r", "server"),
        "-object", authz]
    assert pki.qemu_args("sender", other=True) == [
        "-object", tlscerts.creds_object("tls0", tmp_path / "s", "client"),
        "-object", tlscerts.creds_object("tls1", tmp_path / "r", "server"),
        "-object", authz]


@needs_certtool
def test_pair_layout_and_chain(tmp_path: Path) -> None:
    pki = tlscerts.Pki.create(tmp_path)
    assert sorted(p.name for p in pki.receiver.iterdir()
                  if p.suffix == ".pem") == ["ca-cert.pem", "server-cert.pem",
                                             "server-key.pem"]
    assert sorted(p.name for p in pki.sender.iterdir()
                  if p.suffix == ".pem") == ["ca-cert.pem", "client-cert.pem",
                                             "client-key.pem"]
    for cert in (pki.receiver / "server-cert.pem",
                 pki.sender / "client-cert.pem"):
        assert "Verified" in verify(pki.ca.cert, cert)
    server = info(pki.receiver / "server-cert.pem")
    assert "IPAddress: 127.0.0.1" in server
    assert "TLS WWW Server" in server
    client = info(pki.sender / "client-cert.pem")
    assert f"CN={tlscerts.SENDER_CN}" in client
    assert "TLS WWW Client" in client


@needs_certtool
def test_strangers(tmp_path: Path) -> None:
    pki = tlscerts.Pki.create(tmp_path)
    other = pki.stranger("other-ca")
    assert "Verified" not in verify(pki.ca.cert, other / "client-cert.pem")
    # It trusts the right CA as well, so that the receiver refuses it.
    assert pki.ca.cert.read_text() in (other / "ca-cert.pem").read_text()
    expired = pki.stranger("expired") / "client-cert.pem"
    assert "Not After: Thu Jan 02 00:00:00 UTC 2020" in info(expired)
    unauthorized = pki.stranger("unauthorized") / "client-cert.pem"
    assert "Verified" in verify(pki.ca.cert, unauthorized)
    assert f"CN={tlscerts.SENDER_CN}" not in info(unauthorized)
    with pytest.raises(ValueError):
        pki.stranger("nobody")
