# SPDX-License-Identifier: GPL-2.0-or-later
"""Witness backends: the file witness, and the etcd one over a fake HTTP."""

from __future__ import annotations

import base64
import json
import multiprocessing
import threading
from pathlib import Path
from typing import Any

import pytest

from curlingtool import witness
from curlingtool.witness import (EtcdWitness, FileWitness, MemoryWitness,
                                 Witness, WitnessError, WitnessUnreachable)

KEY = "curling/demo/term"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(params=["file", "memory"])
def local_witness(request: pytest.FixtureRequest, tmp_path: Path) -> Witness:
    if request.param == "file":
        return FileWitness(tmp_path / "witness")
    return MemoryWitness()


def test_compare_and_swap_semantics(local_witness: Witness) -> None:
    w = local_witness
    assert w.read(KEY) is None
    assert not w.compare_and_swap(KEY, "1:A", "2:A")   # absent is not 1:A
    assert w.compare_and_swap(KEY, None, "1:A")        # create
    assert not w.compare_and_swap(KEY, None, "1:B")    # exists already
    assert w.read(KEY) == "1:A"
    assert w.compare_and_swap(KEY, "1:A", "2:B")       # equal: swapped
    assert not w.compare_and_swap(KEY, "1:A", "2:A")   # mismatch
    assert w.read(KEY) == "2:B"
    assert w.read("curling/other/term") is None


def test_file_witness_layout(tmp_path: Path) -> None:
    w = FileWitness(tmp_path / "a" / "b")
    assert w.compare_and_swap(KEY, None, "1:A")
    files = sorted(p.name for p in (tmp_path / "a" / "b").iterdir())
    assert files == [".lock", "curling%2Fdemo%2Fterm"]
    assert (tmp_path / "a" / "b" / "curling%2Fdemo%2Fterm").read_text() == "1:A"
    # another instance (another agent) sees it
    assert FileWitness(tmp_path / "a" / "b").read(KEY) == "1:A"


def test_file_witness_unusable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    w = FileWitness(blocker / "witness")
    with pytest.raises(WitnessUnreachable, match="file witness"):
        w.read(KEY)
    with pytest.raises(WitnessUnreachable):
        w.compare_and_swap(KEY, None, "1:A")


def _count_up(directory: str, times: int, me: str) -> None:
    """Increment the term ``times`` times with read + swap, retrying."""
    w = FileWitness(directory)
    done = 0
    while done < times:
        current = w.read(KEY)
        number = int(current.split(":")[0]) if current else 0
        if w.compare_and_swap(KEY, current, f"{number + 1}:{me}"):
            done += 1


@pytest.mark.parametrize("how", ["processes", "threads"])
def test_file_witness_concurrent_swaps_lose_nothing(tmp_path: Path,
                                                    how: str) -> None:
    directory, sides, times = str(tmp_path / "w"), 4, 25
    if how == "processes":
        ctx = multiprocessing.get_context("fork")
        workers: list[Any] = [ctx.Process(target=_count_up,
                                          args=(directory, times, f"p{i}"))
                              for i in range(sides)]
    else:
        workers = [threading.Thread(target=_count_up,
                                    args=(directory, times, f"t{i}"))
                   for i in range(sides)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        if how == "processes":
            assert w.exitcode == 0
    assert int(FileWitness(directory).read(KEY).split(":")[0]) == sides * times


def test_file_witness_one_creator_wins(tmp_path: Path) -> None:
    directory = tmp_path / "w"
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        w = FileWitness(directory)
        barrier.wait()
        results.append(w.compare_and_swap(KEY, None, f"1:s{i}"))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


class FakeEtcd:
    """The JSON gateway of etcd 3.4 in a dict, as a ``post`` function; it
    records what it was sent and answers as the real server does."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.sent: list[tuple[str, dict[str, Any], float]] = []
        self.down: set[str] = set()   # endpoints that do not answer
        self.revision = 1

    def header(self) -> dict[str, str]:
        return {"cluster_id": "1", "member_id": "2",
                "revision": str(self.revision), "raft_term": "2"}

    def __call__(self, url: str, body: bytes, timeout: float) -> bytes:
        request = json.loads(body)
        self.sent.append((url, request, timeout))
        endpoint, _, path = url.partition("/v3/")
        if endpoint in self.down:
            raise WitnessUnreachable("<urlopen error [Errno 111] "
                                     "Connection refused>")
        if path == "kv/range":
            answer: dict[str, Any] = {"header": self.header()}
            key = request["key"]
            if key in self.kv:
                answer["kvs"] = [{"key": key, "create_revision": "2",
                                  "mod_revision": "2", "version": "1",
                                  "value": self.kv[key]}]
                answer["count"] = "1"
            return json.dumps(answer).encode()
        assert path == "kv/txn"
        (compare,) = request["compare"]
        key = compare["key"]
        if compare["target"] == "CREATE":
            ok = key not in self.kv
        else:
            ok = self.kv.get(key) == compare["value"]
        answer = {"header": self.header()}
        if ok:
            (op,) = request["success"]
            self.kv[key] = op["request_put"]["value"]
            self.revision += 1
            answer.update(succeeded=True, responses=[
                {"response_put": {"header": {"revision": str(self.revision)}}}])
        return json.dumps(answer).encode()


def test_etcd_requests_are_the_gateway_json() -> None:
    fake = FakeEtcd()
    w = EtcdWitness(["http://127.0.0.1:2379/"], timeout=0.5, post=fake)
    assert w.read(KEY) is None
    assert w.compare_and_swap(KEY, None, "1:A")
    assert w.compare_and_swap(KEY, "1:A", "2:B")
    assert fake.sent == [
        ("http://127.0.0.1:2379/v3/kv/range", {"key": b64(KEY)}, 0.5),
        ("http://127.0.0.1:2379/v3/kv/txn", {
            "compare": [{"key": b64(KEY), "target": "CREATE",
                         "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": b64(KEY),
                                         "value": b64("1:A")}}]}, 0.5),
        ("http://127.0.0.1:2379/v3/kv/txn", {
            "compare": [{"key": b64(KEY), "target": "VALUE",
                         "result": "EQUAL", "value": b64("1:A")}],
            "success": [{"request_put": {"key": b64(KEY),
                                         "value": b64("2:B")}}]}, 0.5),
    ]


def test_etcd_answers_are_parsed() -> None:
    fake = FakeEtcd()
    w = EtcdWitness(["http://e1:2379"], post=fake)
    assert w.compare_and_swap(KEY, None, "1:A")
    assert not w.compare_and_swap(KEY, None, "1:B")     # no "succeeded"
    assert not w.compare_and_swap(KEY, "7:A", "8:A")
    assert w.read(KEY) == "1:A"


def test_etcd_empty_value_has_no_value_field() -> None:
    def post(url: str, body: bytes, timeout: float) -> bytes:
        return json.dumps({"header": {}, "count": "1",
                           "kvs": [{"key": b64(KEY)}]}).encode()
    assert EtcdWitness(["http://e1:2379"], post=post).read(KEY) == ""


def test_etcd_tries_every_endpoint() -> None:
    fake = FakeEtcd()
    fake.down.add("http://e1:2379")
    w = EtcdWitness(["http://e1:2379", "http://e2:2379"], post=fake)
    assert w.compare_and_swap(KEY, None, "1:A")
    assert [url for url, _, _ in fake.sent] == [
        "http://e1:2379/v3/kv/txn", "http://e2:2379/v3/kv/txn"]
    # the endpoint that answered is asked first next time
    assert w.read(KEY) == "1:A"
    assert fake.sent[-1][0] == "http://e2:2379/v3/kv/range"


def test_etcd_all_endpoints_down_is_unreachable() -> None:
    fake = FakeEtcd()
    fake.down.update({"http://e1:2379", "http://e2:2379"})
    w = EtcdWitness(["http://e1:2379", "http://e2:2379"], post=fake)
    with pytest.raises(WitnessUnreachable) as info:
        w.compare_and_swap(KEY, None, "1:A")
    assert str(info.value) == (
        "etcd http://e1:2379: <urlopen error [Errno 111] Connection refused>; "
        "http://e2:2379: <urlopen error [Errno 111] Connection refused>")


@pytest.mark.parametrize("raw", [b"<html>", b"[1, 2]"])
def test_etcd_nonsense_is_an_error(raw: bytes) -> None:
    w = EtcdWitness(["http://e1:2379"], post=lambda *_a: raw)
    with pytest.raises(WitnessError) as info:
        w.read(KEY)
    assert not isinstance(info.value, WitnessUnreachable)


def test_etcd_refusal_is_an_error_not_unreachable() -> None:
    def post(url: str, body: bytes, timeout: float) -> bytes:
        raise WitnessError('HTTP 400 {"error":"illegal base64 data"}')
    w = EtcdWitness(["http://e1:2379", "http://e2:2379"], post=post)
    with pytest.raises(WitnessError, match="etcd http://e1:2379: HTTP 400"):
        w.read(KEY)


def test_urllib_post_without_network_is_unreachable() -> None:
    # the no_network fixture refuses the connection, like a dead endpoint
    w = EtcdWitness(["http://127.0.0.1:9"], timeout=0.2)
    with pytest.raises(WitnessUnreachable, match="^etcd http://127.0.0.1:9: "):
        w.read(KEY)


@pytest.mark.parametrize("spec,kind", [
    ("etcd:http://127.0.0.1:2379", EtcdWitness),
    ("etcd:http://a:2379,http://b:2379", EtcdWitness),
    ("file:/tmp/curling-witness", FileWitness),
])
def test_open_witness(spec: str, kind: type) -> None:
    assert isinstance(witness.open_witness(spec), kind)


def test_open_witness_endpoints() -> None:
    w = witness.open_witness("etcd:http://a:2379,http://b:2379/", timeout=0.3)
    assert isinstance(w, EtcdWitness)
    assert w.endpoints == ["http://a:2379", "http://b:2379"]
    assert w.timeout == 0.3
    assert str(w) == "etcd witness http://a:2379,http://b:2379"


@pytest.mark.parametrize("spec", ["", "etcd:", "file:", "zk:host:2181",
                                  "etcd:127.0.0.1:2379", "/tmp/dir"])
def test_open_witness_rejects(spec: str) -> None:
    with pytest.raises(WitnessError):
        witness.open_witness(spec)
