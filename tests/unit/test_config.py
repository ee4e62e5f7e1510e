"""Config loading: a good file parses; every bad key is named in a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmp_sdei.config import load, parse
from qmp_sdei.errors import ConfigError
from qmp_sdei.sdei import EventSpec

GOOD = """
[vm]
name = "vm1"
state_dir = "/tmp/qmp-sdei-test/vm1"

[qmp]
socket = "/run/qmp-sdei/vm1.sock"
mode = "listen"
timeout = 5

[sdei]
version = "1.0"
vendor = 0x4b564d
profile = "kvm"
bind_slots = [3, 2]
events = [
  { number = 1000, name = "ras" },
  { number = 1001, priority = "critical" },
  { number = 2000, type = "shared" },
]

[psci]
version = "1.0"

[conduit]
enabled = true
gdb = "tcp:127.0.0.1:1234"
elf = "guest.elf"
trap_sites = [0x40080804]
guest_ram = "/dev/shm/qmp-sdei/vm1.ram"

[log]
level = "debug"
format = "json"
"""


def test_good_config(tmp_path: Path) -> None:
    path = tmp_path / "vm1.toml"
    path.write_text(GOOD)
    cfg = load(path)
    assert cfg.name == "vm1"
    assert cfg.qmp.address == "/run/qmp-sdei/vm1.sock"
    assert cfg.qmp.mode == "listen"
    assert cfg.qmp.timeout == 5.0
    assert cfg.sdei.events == (
        EventSpec(1000, name="ras"),
        EventSpec(1001, critical=True),
        EventSpec(2000, shared=True),
    )
    assert cfg.sdei.bind_slots == (3, 2)
    assert cfg.versions.sdei == "1.0"
    assert cfg.versions.sdei_vendor == 0x4B564D
    assert cfg.versions.psci == "1.0"
    assert cfg.conduit.trap_sites == (0x40080804,)
    assert cfg.conduit.guest_ram == Path("/dev/shm/qmp-sdei/vm1.ram")
    assert cfg.log.format == "json"


def test_defaults_and_tcp_address() -> None:
    cfg = parse({"qmp": {"socket": "tcp:127.0.0.1:4444"}})
    assert cfg.qmp.address == ("127.0.0.1", 4444)
    assert cfg.versions.sdei == "latest"
    assert cfg.versions.psci == "auto"
    assert cfg.sdei.profile == "tf-a"
    assert cfg.state_dir.name == "default"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "qmp.socket: is required"),
        ({"qmp": {"socket": "tcp:host"}}, "qmp.socket: 'tcp:host' is not tcp:HOST:PORT"),
        ({"qmp": {"socket": "/s", "mode": "pull"}}, "qmp.mode: 'pull' is not one of connect, listen"),
        ({"qmp": {"socket": "/s", "timeout": 0}}, "qmp.timeout: must be positive"),
        ({"qmp": {"socket": "/s", "sockit": 1}}, "qmp.sockit: unknown key"),
        ({"qmp": {"socket": 5}}, "qmp.socket: expected a string"),
        ({"qmp": {"socket": "/s"}, "extra": {}}, "extra: unknown key"),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"version": "2.0"}},
            "sdei.version: SDEI version 2.0 is not supported",
        ),
        (
            {"qmp": {"socket": "/s"}, "psci": {"version": "1.3"}},
            "psci.version: PSCI version 1.3 is not supported",
        ),
        ({"qmp": {"socket": "/s"}, "sdei": {"profile": "xen"}}, "sdei.profile: 'xen' is not one of"),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"bind_slots": [1]}},
            "sdei.bind_slots: must be [private, shared]",
        ),
        ({"qmp": {"socket": "/s"}, "sdei": {"vendor": -1}}, "sdei.vendor: must fit in 32 bits"),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"events": [{"number": 1 << 31}]}},
            "sdei.events[0].number: must be 0..0x7fffffff",
        ),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"events": [{"name": "x"}]}},
            "sdei.events[0].number: is required",
        ),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"events": [{"number": 5}, {"number": 5}]}},
            "sdei.events[1].number: event 5 is already declared",
        ),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"events": [{"number": 0, "type": "shared"}]}},
            "sdei.events[0]: event 0 is always private",
        ),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"events": [{"number": 5, "type": "global"}]}},
            "sdei.events[0].type",
        ),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"events": [{"number": True}]}},
            "sdei.events[0].number: expected an integer, got a boolean",
        ),
        ({"qmp": {"socket": "/s"}, "sdei": {"events": ["x"]}}, "sdei.events[0]: must be a table"),
        (
            {"qmp": {"socket": "/s"}, "conduit": {"trap_sites": [3]}},
            "conduit.trap_sites: must list 4-byte-aligned",
        ),
        ({"qmp": {"socket": "/s"}, "conduit": {"gdb": "1234"}}, "conduit.gdb: must be tcp:HOST:PORT"),
        ({"qmp": {"socket": "/s"}, "log": {"format": "xml"}}, "log.format"),
        # Found by the fault sweep: each was accepted and then failed (or misbehaved) at run time.
        ({"qmp": {"socket": "/s"}, "conduit": {"gdb": "tcp:nohost"}}, "conduit.gdb: must be tcp:HOST:PORT"),
        ({"qmp": {"socket": "/s"}, "conduit": {"gdb": "tcp:h:99999"}}, "conduit.gdb: must be tcp:HOST:PORT"),
        ({"qmp": {"socket": "/s"}, "vm": {"state_dir": "/tmp/x\0y"}}, "vm.state_dir: contains a NUL character"),
        ({"qmp": {"socket": "/s\0"}}, "qmp.socket: contains a NUL character"),
        ({"qmp": {"socket": "/s"}, "conduit": {"elf": "a\0.elf"}}, "conduit.elf: contains a NUL character"),
        ({"qmp": {"socket": "/s"}, "conduit": {"guest_ram": "vm1.ram"}}, "conduit.guest_ram: must be an absolute path"),
        ({"qmp": {"socket": "/s"}, "conduit": {"guest_ram": 3}}, "conduit.guest_ram: expected a string"),
        ({"qmp": {"socket": "/s", "timeout": float("inf")}}, "qmp.timeout: must be a finite number of seconds"),
        ({"qmp": {"socket": "/s", "timeout": float("nan")}}, "qmp.timeout: must be a finite number of seconds"),
        ({"qmp": {"socket": "/s"}, "sdei": {"version": " 1.1"}}, "sdei.version: SDEI version ' 1.1' is not"),
        ({"qmp": {"socket": "/s"}, "psci": {"version": "1.0 "}}, "psci.version: PSCI version '1.0 ' is not"),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"events": [{"number": 0x4000_0000}]}},
            "sdei.events[0].number: 0x40000000 is in the range reserved for INTERRUPT_BIND",
        ),
        (
            {"qmp": {"socket": "/s"}, "sdei": {"events": [{"number": 0x4001_FFFF}]}},
            "sdei.events[0].number: 0x4001ffff is in the range reserved for INTERRUPT_BIND",
        ),
        ({"qmp": {"socket": "/" + "s" * 107}}, "qmp.socket: '/sss"),
        ({"qmp": {"socket": "/s"}, "vm": {"name": "../etc"}}, "vm.name: '../etc' cannot name the default state"),
    ],
)
def test_bad_config_names_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert str(info.value).startswith(message.split(":", maxsplit=1)[0])
    assert message in str(info.value)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[qmp\nsocket=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[vm]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte 0xe9 at offset 16\)"):
        load(path)


def test_config_nested_too_deeply(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.toml: not valid TOML"):
        load(path)


def test_edge_values_that_are_fine() -> None:
    cfg = parse({"qmp": {"socket": "tcp:[::1]:4444"}, "conduit": {"gdb": "tcp:[::1]:1234", "trap_sites": [0x1000]}})
    assert cfg.qmp.address == ("::1", 4444)
    assert cfg.conduit.gdb == "tcp:[::1]:1234"
    assert parse({"qmp": {"socket": "/s"}, "sdei": {"events": [{"number": 0x3FFF_FFFF}, {"number": 0x4002_0000}]}})
    assert parse({"qmp": {"socket": "/s"}, "vm": {"name": "../x", "state_dir": "/srv/x"}}).name == "../x"


def test_runtime_changes() -> None:
    base = parse({"qmp": {"socket": "/s"}})
    new = parse({"qmp": {"socket": "/s"}, "log": {"level": "debug"}, "sdei": {"events": [{"number": 9}]}})
    allowed, refused = base.runtime_changes(new)
    assert allowed == ["log"]
    assert refused == ["sdei"]
