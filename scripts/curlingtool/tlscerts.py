# SPDX-License-Identifier: GPL-2.0-or-later
"""x509 credentials for Curling over TLS, made with GnuTLS's ``certtool``.

A certificate authority issues certificates into folders laid out as
QEMU's ``tls-creds-x509`` object reads them: ``ca-cert.pem`` and either
``server-cert.pem`` and ``server-key.pem`` (the receiver, which listens)
or ``client-cert.pem`` and ``client-key.pem`` (the sender).  The tests and
the benchmark use them; docs/curling.txt shows the same steps by hand.

Only for tests: the keys are written unencrypted.
"""

from __future__ import annotations

import dataclasses
import pathlib
import secrets
import shutil
import subprocess
from typing import Iterable, Sequence

from curlingtool import CurlingError

#: Validity of a certificate that is not meant to be expired, in days.
VALID_DAYS = 30
#: The validity of an expired certificate: long over.
EXPIRED = ("2020-01-01 00:00:00 UTC", "2020-01-02 00:00:00 UTC")


class TlsToolMissing(CurlingError):
    """certtool is not installed."""


def certtool() -> str:
    path = shutil.which("certtool")
    if not path:
        raise TlsToolMissing("certtool is not installed (Debian package "
                             "gnutls-bin; python3 scripts/build.py "
                             "installs it)")
    return path


def _run(args: Sequence[str | pathlib.Path]) -> None:
    proc = subprocess.run([certtool(), *map(str, args)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise CurlingError(f"certtool {' '.join(map(str, args))} failed: "
                           f"{proc.stderr.strip()}")


def _template(path: pathlib.Path, cn: str, lines: Iterable[str],
              expired: bool) -> pathlib.Path:
    text = [f'cn = "{cn}"', f"serial = {secrets.randbelow(2**31)}"]
    if expired:
        text += [f'activation_date = "{EXPIRED[0]}"',
                 f'expiration_date = "{EXPIRED[1]}"']
    else:
        text.append(f"expiration_days = {VALID_DAYS}")
    text += lines
    path.write_text("\n".join(text) + "\n")
    return path


def _key(path: pathlib.Path) -> pathlib.Path:
    _run(["--generate-privkey", "--key-type=ecdsa", "--outfile", path])
    return path


@dataclasses.dataclass
class Authority:
    """A certificate authority in ``folder``: ``ca-cert.pem``,
    ``ca-key.pem``."""

    folder: pathlib.Path

    @property
    def cert(self) -> pathlib.Path:
        return self.folder / "ca-cert.pem"

    @property
    def key(self) -> pathlib.Path:
        return self.folder / "ca-key.pem"

    @classmethod
    def create(cls, folder: pathlib.Path,
               cn: str = "Curling test CA") -> "Authority":
        folder.mkdir(parents=True, exist_ok=True)
        ca = cls(folder)
        _key(ca.key)
        template = _template(folder / "ca.info", cn,
                             ["ca", "cert_signing_key"], expired=False)
        _run(["--generate-self-signed", "--load-privkey", ca.key,
              "--template", template, "--outfile", ca.cert])
        return ca

    def issue(self, folder: pathlib.Path, endpoint: str, cn: str,
              hosts: Sequence[str] = ("127.0.0.1",),
              expired: bool = False) -> pathlib.Path:
        """Certificate and key for ``endpoint`` ("server" or "client")
        with common name ``cn``, in ``folder`` beside this CA's
        certificate; returns ``folder``.  A server certificate names
        ``hosts`` (IP addresses or DNS names)."""
        if endpoint not in ("server", "client"):
            raise ValueError(f"endpoint {endpoint!r}")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.cert, folder / "ca-cert.pem")
        key = _key(folder / f"{endpoint}-key.pem")
        lines = ["signing_key", "encryption_key"]
        if endpoint == "server":
            lines.append("tls_www_server")
            for host in hosts:
                kind = "ip_address" if host[:1].isdigit() else "dns_name"
                lines.append(f'{kind} = "{host}"')
        else:
            lines.append("tls_www_client")
        template = _template(folder / f"{endpoint}.info", cn, lines, expired)
        _run(["--generate-certificate", "--load-privkey", key,
              "--load-ca-certificate", self.cert,
              "--load-ca-privkey", self.key,
              "--template", template,
              "--outfile", folder / f"{endpoint}-cert.pem"])
        return folder


def creds_object(obj_id: str, folder: pathlib.Path, endpoint: str) -> str:
    """The ``-object`` argument of QEMU's x509 credentials in ``folder``;
    the peer's certificate is always checked."""
    return (f"tls-creds-x509,id={obj_id},dir={folder},endpoint={endpoint},"
            "verify-peer=on")


def authz_object(obj_id: str, cn: str) -> str:
    """The ``-object`` argument of an authorization that lets in only the
    client certificate whose distinguished name is ``CN=cn``."""
    return f"authz-simple,id={obj_id},identity=CN={cn}"


#: Common names of the two sides' certificates.
SENDER_CN = "curling-sender"
RECEIVER_CN = "curling-receiver"

#: Client credentials a stranger may hold (Pki.stranger).
STRANGERS = {
    "other-ca": "a certificate from another CA",
    "expired": "an expired certificate from the right CA",
    "unauthorized": "a certificate from the right CA whose name tls-authz "
                    "does not allow",
}


@dataclasses.dataclass
class Pki:
    """A CA and the credentials of a protected pair under ``root``:
    ``receiver`` (server endpoint, naming ``hosts``) and ``sender``
    (client endpoint, common name SENDER_CN)."""

    root: pathlib.Path
    ca: Authority
    receiver: pathlib.Path
    sender: pathlib.Path

    @classmethod
    def create(cls, root: pathlib.Path,
               hosts: Sequence[str] = ("127.0.0.1",)) -> "Pki":
        ca = Authority.create(root / "ca")
        return cls(root, ca,
                   ca.issue(root / "receiver", "server", RECEIVER_CN, hosts),
                   ca.issue(root / "sender", "client", SENDER_CN))

    def qemu_args(self, role: str, other: bool = False) -> list[str]:
        """QEMU arguments of ``role``'s ("sender" or "receiver")
        credentials, object ``tls0``, and an authorization ``authz0`` that
        lets in only the sender's name (tls-authz, on a receiver).
        ``other`` adds the other role's credentials as ``tls1`` (a
        receiver that will protect its guest again)."""
        folders = {"receiver": (self.receiver, "server"),
                   "sender": (self.sender, "client")}
        args = ["-object", creds_object("tls0", *folders[role])]
        if other:
            args += ["-object", creds_object(
                "tls1", *folders["sender" if role == "receiver"
                                 else "receiver"])]
        return args + ["-object", authz_object("authz0", SENDER_CN)]

    def stranger(self, kind: str) -> pathlib.Path:
        """Client credentials of one of the STRANGERS."""
        folder = self.root / f"stranger-{kind}"
        if kind == "other-ca":
            # It trusts the right CA too: the receiver, not the stranger,
            # is the side that must refuse.
            other = Authority.create(self.root / "other-ca", "Another CA")
            other.issue(folder, "client", SENDER_CN)
            (folder / "ca-cert.pem").write_text(other.cert.read_text() +
                                                self.ca.cert.read_text())
            return folder
        if kind == "expired":
            return self.ca.issue(folder, "client", SENDER_CN, expired=True)
        if kind == "unauthorized":
            return self.ca.issue(folder, "client", "curling-stranger")
        raise ValueError(f"unknown stranger {kind!r}")
