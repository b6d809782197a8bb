# SPDX-License-Identifier: GPL-2.0-or-later
"""A protected guest's description: what it accepts, and every refusal
naming its file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from curlingtool import description
from curlingtool.description import DescriptionError

GOOD = """
[guest]
name = "web"
memory = "1G"
vcpus = 2
args = ["-kernel", "/srv/web/vmlinuz", "-display", "none",
        "-serial", "file:{run}/{host}.log"]

[[guest.drives]]
id = "disk0"
device = "virtio-blk-pci"

[[guest.nics]]
id = "net0"
device = "virtio-net-pci"
mac = "52:54:00:12:34:56"

[protection]
witness = "etcd:http://10.0.0.9:2379"
interval = 50
timeout = 2000

[hosts.A]
address = "10.0.0.1"
drives = { disk0 = "/srv/web/disk0.img" }
nics = { net0 = "tap:tap-web" }

[hosts.B]
address = "10.0.0.2"
drives = { disk0 = "/srv/web/disk0.img" }
nics = { net0 = "bridge:br0" }
tls = "/etc/curling/pki"

[hosts.C]
address = "10.0.0.3"
drives = { disk0 = "/data/web.img" }
nics = { net0 = "tap:tap-web" }
"""


def test_reads_a_description() -> None:
    d = description.parse(GOOD, "web.toml")
    assert d.guest.name == "web" and d.guest.vcpus == 2
    assert d.guest.machine == "q35"
    assert d.guest.drives[0].format == "raw"
    assert d.protection.port == description.DEFAULT_PORT
    assert (d.protection.interval, d.protection.timeout) == (50, 2000)
    assert [h.id for h in d.hosts] == ["A", "B", "C"]
    assert d.host("B").tls == "/etc/curling/pki"
    assert d.host("C").run == description.DEFAULT_RUN_DIR


def test_others_in_protection_order() -> None:
    d = description.parse(GOOD)
    assert [h.id for h in d.others("A")] == ["B", "C"]
    assert [h.id for h in d.others("B")] == ["C", "A"]
    assert [h.id for h in d.others("C")] == ["A", "B"]


def test_fingerprint_covers_what_hosts_share_only() -> None:
    base = description.parse(GOOD).fingerprint()
    # A host's own paths do not count
    moved = GOOD.replace('"/data/web.img"', '"/other/web.img"')
    assert description.parse(moved).fingerprint() == base
    # The guest and the settings do
    for old, new in (('memory = "1G"', 'memory = "2G"'),
                     ("timeout = 2000", "timeout = 3000"),
                     ('address = "10.0.0.3"', 'address = "10.0.0.4"')):
        assert description.parse(GOOD.replace(old, new)).fingerprint() != \
            base, new


@pytest.mark.parametrize("old, new, message", [
    ("vcpus = 2", "vcpus = 2\ncolour = 1", "web.toml: guest.colour: unknown "
     "key"),
    ('drives = { disk0 = "/data/web.img" }', "", "web.toml: hosts.C.drives: "
     "no image for drive 'disk0'"),
    ('nics = { net0 = "bridge:br0" }', 'nics = { net0 = "wifi:x" }',
     "web.toml: hosts.B.nics.net0: 'wifi:x': tap:NAME or bridge:NAME"),
    ('address = "10.0.0.3"', 'address = "10.0.0.1"', "web.toml: "
     "hosts.C.address: 10.0.0.1 is also hosts.A.address: each host needs "
     "its own"),
    ("vcpus = 2", 'vcpus = "2"', "web.toml: guest.vcpus: must be an integer,"
     " not str '2'"),
    ("timeout = 2000", "timeout = 100", "web.toml: protection.timeout: 100: "
     "from 200 to 600000"),
    ('memory = "1G"', 'memory = "lots"', "web.toml: guest.memory: 'lots'"),
    ('name = "web"', 'name = "my web"', "web.toml: guest.name: guest name "
     "'my web'"),
    ('mac = "52:54:00:12:34:56"', 'mac = "52:54:00"', "web.toml: "
     "guest.nics[0].mac: '52:54:00'"),
    ('args = ["-kernel",', 'args = ["-incoming", "defer", "-kernel",',
     "web.toml: guest.args: -incoming is Curling's to set"),
    ('witness = "etcd:http://10.0.0.9:2379"', 'witness = "zookeeper:x"',
     "web.toml: protection.witness: 'zookeeper:x'"),
    ('"/data/web.img"', '"web.img"', "web.toml: hosts.C.drives.disk0: "
     "'web.img': an absolute path"),
    ('[hosts.C]\naddress = "10.0.0.3"', '[hosts.C]\naddress = "10.0.0.3"\n'
     'drivez = 1', "web.toml: hosts.C.drivez: unknown key"),
    ("[protection]", "[protektion]", "web.toml: protection: missing"),
    ("[hosts.B]", "[hosts.A]", "web.toml: not TOML"),
])
def test_refuses_naming_file_and_key(old: str, new: str,
                                     message: str) -> None:
    assert old in GOOD
    with pytest.raises(DescriptionError) as exc:
        description.parse(GOOD.replace(old, new, 1), "web.toml")
    assert str(exc.value).startswith(message), str(exc.value)


def test_two_or_three_hosts() -> None:
    one = GOOD[:GOOD.index("[hosts.B]")]
    with pytest.raises(DescriptionError, match=r"hosts: 1 host\(s\): two or "
                       "three"):
        description.parse(one, "web.toml")
    four = GOOD + ('\n[hosts.D]\naddress = "10.0.0.4"\n'
                   'drives = { disk0 = "/d.img" }\n'
                   'nics = { net0 = "tap:t" }\n')
    with pytest.raises(DescriptionError, match="4 host"):
        description.parse(four, "web.toml")


def test_unknown_host() -> None:
    d = description.parse(GOOD, "web.toml")
    with pytest.raises(DescriptionError, match="no host 'D' in \\[hosts\\] "
                       "\\(it has A, B, C\\)"):
        d.host("D")


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DescriptionError, match="web.toml: No such file"):
        description.load(tmp_path / "web.toml")
    (tmp_path / "web.toml").write_text(GOOD)
    assert description.load(tmp_path / "web.toml").guest.name == "web"


def test_the_readme_example_is_valid() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("    # /etc/curling/web.toml")
    end = readme.index("    # on every host", start)
    text = "\n".join(line[4:] for line in readme[start:end].splitlines()[1:])
    d = description.parse(text, "README.md")
    assert d.guest.name == "web" and [h.id for h in d.hosts] == ["A", "B"]
