# SPDX-License-Identifier: GPL-2.0-or-later
"""Witnesses: the third party both Curling hosts ask who may act.

One small interface, ``Witness``: ``read(key)`` and
``compare_and_swap(key, expected, new)``, both short and blocking. A
witness that does not answer in time raises ``WitnessUnreachable``; the
caller must then assume nothing (a swap may or may not have happened).

``open_witness(spec)`` opens one of:

- ``etcd:http://HOST:PORT[,http://HOST:PORT...]``: an etcd 3.4 (or later)
  cluster through its JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``),
  with the standard library only. Endpoints are tried in turn.
- ``file:/path/to/dir``: no server, one file per key in that directory,
  each swap done under ``flock`` and written atomically. It only
  arbitrates between agents on ONE host (flock does not hold across
  hosts, not even over NFS): for the demo and one-machine set-ups.

``MemoryWitness`` keeps the keys in this process, for tests.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import fcntl
import http.client
import json
import logging
import os
import pathlib
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterator, Optional, Sequence

from . import CurlingError

log = logging.getLogger(__name__)

#: Seconds a witness request may take before it counts as unreachable.
TIMEOUT = 1.0


class WitnessError(CurlingError):
    """The witness answered something unusable, or its spec is wrong."""


class WitnessUnreachable(WitnessError):
    """The witness did not answer in time (it may have done the request)."""


class Witness(abc.ABC):
    """A key-value store with an atomic compare-and-swap."""

    @abc.abstractmethod
    def read(self, key: str) -> Optional[str]:
        """The value of ``key``; None when it does not exist."""

    @abc.abstractmethod
    def compare_and_swap(self, key: str, expected: Optional[str],
                         new: str) -> bool:
        """Set ``key`` to ``new`` if it holds ``expected`` (``None``: if it
        does not exist). True when it was written, False when not."""


class MemoryWitness(Witness):
    """Keys in a dict of this process: for tests."""

    def __init__(self, values: Optional[dict[str, str]] = None) -> None:
        self.values = dict(values or {})
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return "memory witness"

    def read(self, key: str) -> Optional[str]:
        with self._lock:
            return self.values.get(key)

    def compare_and_swap(self, key: str, expected: Optional[str],
                         new: str) -> bool:
        with self._lock:
            if self.values.get(key) != expected:
                return False
            self.values[key] = new
            return True


class FileWitness(Witness):
    """One file per key in ``directory``, swapped under an flock.

    Only agents of one host see the same lock: never use it to arbitrate
    between two hosts.
    """

    LOCK = ".lock"

    def __init__(self, directory: os.PathLike[str] | str) -> None:
        self.directory = pathlib.Path(directory)

    def __str__(self) -> str:
        return f"file witness {self.directory}"

    def _path(self, key: str) -> pathlib.Path:
        if not key:
            raise WitnessError("empty witness key")
        return self.directory / urllib.parse.quote(key, safe="")

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / self.LOCK, os.O_RDWR | os.O_CREAT,
                         0o644)
        except OSError as exc:
            raise WitnessUnreachable(f"{self}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, mode)
            yield
        except OSError as exc:
            raise WitnessUnreachable(f"{self}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)   # releases the lock

    def _read(self, path: pathlib.Path) -> Optional[str]:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def _write(self, path: pathlib.Path, value: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def read(self, key: str) -> Optional[str]:
        path = self._path(key)
        with self._locked(fcntl.LOCK_SH):
            return self._read(path)

    def compare_and_swap(self, key: str, expected: Optional[str],
                         new: str) -> bool:
        path = self._path(key)
        with self._locked(fcntl.LOCK_EX):
            if self._read(path) != expected:
                return False
            self._write(path, new)
            return True


#: ``post(url, body, timeout) -> response body``; raises WitnessUnreachable
#: when the endpoint does not answer, WitnessError when it refuses.
Post = Callable[[str, bytes, float], bytes]


#: urllib without the environment's proxies: the witness is asked directly.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urllib_post(url: str, body: bytes, timeout: float) -> bytes:
    """POST a JSON body with urllib, straight to ``url``."""
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        if exc.code >= 500:
            raise WitnessUnreachable(f"HTTP {exc.code} {detail}") from None
        raise WitnessError(f"HTTP {exc.code} {detail}") from None
    except urllib.error.URLError as exc:
        raise WitnessUnreachable(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise WitnessUnreachable(str(exc) or type(exc).__name__) from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class EtcdWitness(Witness):
    """An etcd cluster through its v3 JSON gateway (etcd 3.4 or later)."""

    def __init__(self, endpoints: Sequence[str], timeout: float = TIMEOUT,
                 post: Post = urllib_post) -> None:
        if not endpoints:
            raise WitnessError("etcd witness without an endpoint")
        for url in endpoints:
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise WitnessError(f"etcd endpoint {url!r}: not an http(s) URL")
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.timeout = timeout
        self._post = post
        self._first = 0   # the endpoint that answered last

    def __str__(self) -> str:
        return f"etcd witness {','.join(self.endpoints)}"

    def _call(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(request, sort_keys=True).encode()
        failures = []
        count = len(self.endpoints)
        for i in range(count):
            index = (self._first + i) % count
            url = self.endpoints[index]
            try:
                raw = self._post(url + path, body, self.timeout)
            except WitnessUnreachable as exc:
                log.debug("etcd %s%s: %s", url, path, exc)
                failures.append(f"{url}: {exc}")
                continue
            except WitnessError as exc:
                raise WitnessError(f"etcd {url}: {exc}") from None
            self._first = index
            try:
                answer = json.loads(raw)
            except ValueError:
                raise WitnessError(f"etcd {url}: not JSON: {raw[:80]!r}") from None
            if not isinstance(answer, dict):
                raise WitnessError(f"etcd {url}: unexpected answer {answer!r}")
            return answer
        raise WitnessUnreachable("etcd " + "; ".join(failures))

    def read(self, key: str) -> Optional[str]:
        answer = self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        if not kvs:
            return None
        # etcd leaves "value" out when it is empty
        return base64.b64decode(kvs[0].get("value", "")).decode("utf-8")

    def compare_and_swap(self, key: str, expected: Optional[str],
                         new: str) -> bool:
        k = _b64(key)
        if expected is None:
            compare = {"key": k, "target": "CREATE", "result": "EQUAL",
                       "create_revision": "0"}
        else:
            compare = {"key": k, "target": "VALUE", "result": "EQUAL",
                       "value": _b64(expected)}
        answer = self._call("/v3/kv/txn", {
            "compare": [compare],
            "success": [{"request_put": {"key": k, "value": _b64(new)}}],
        })
        # etcd leaves "succeeded" out when it is false
        return answer.get("succeeded", False) is True


def open_witness(spec: str, timeout: float = TIMEOUT) -> Witness:
    """The witness of ``spec``: ``etcd:URL[,URL...]`` or ``file:DIR``."""
    kind, _, rest = spec.partition(":")
    if kind == "etcd" and rest:
        return EtcdWitness([u for u in rest.split(",") if u], timeout=timeout)
    if kind == "file" and rest:
        return FileWitness(rest)
    raise WitnessError(f"witness {spec!r}: use etcd:http://HOST:PORT[,...] "
                       "or file:/path/to/dir")
