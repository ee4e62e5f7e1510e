"""The sidecar's TOML configuration: parsed once, validated completely, then immutable.

Every problem raises :class:`~qmp_sdei.errors.ConfigError` whose message starts with the key path
(``sdei.events[2].number: ...``), so an operator can find it in the file. Unknown keys are errors:
a typo must not silently fall back to a default. Example (``examples/vm1.toml`` has a full one)::

    [qmp]
    socket = "/run/qmp-sdei/vm1.sock"   # or "tcp:127.0.0.1:4444"
    mode = "connect"                    # "listen": QEMU connects to us (chardev reconnect=N)

    [sdei]
    version = "latest"                  # "1.0" | "1.1" | "latest"
    profile = "tf-a"                    # "tf-a" | "kvm"
    bind_slots = [3, 3]                 # (private, shared) INTERRUPT_BIND slots
    events = [
      { number = 1000, type = "private", priority = "normal", name = "ras" },
      { number = 2000, type = "shared", priority = "critical" },
    ]

    [psci]
    version = "auto"                    # "0.2" | "1.0" | "1.1" | "auto" (what QEMU implements)

    [migration]
    transport = "auto"                  # "dbus-vmstate" | "control" | "auto" (dbus-vmstate if QEMU has it)
    peer = "unix:/var/lib/qmp-sdei/vm1-dst/control.sock"   # or "mqtt" / "mqtt:NAME" (control transport)
    peer_timeout = 3.0                  # seconds the destination has to acknowledge the state
    tcp_nodelay = true                  # migrations this sidecar starts to tcp: connect without Nagle

No I/O beyond reading the file.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qmp_sdei.errors import ConfigError, VersionError
from qmp_sdei.metrics_settings import MetricsSettings, parse_metrics_table
from qmp_sdei.sdei.dispatcher import DYNAMIC_RANGE
from qmp_sdei.sdei.model import PROFILES, EventSpec
from qmp_sdei.versions import VersionRequest

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_STATE_ROOT = Path("/var/lib/qmp-sdei")
#: sun_path holds 108 bytes including the terminating NUL
UNIX_PATH_MAX = 107

T = TypeVar("T")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class QmpSettings:
    #: unix socket path, or (host, port) for TCP
    address: str | tuple[str, int]
    #: "connect": we connect to QEMU's server socket; "listen": QEMU connects to ours
    mode: str = "connect"
    #: how long to wait for QEMU to appear (it may start after the sidecar)
    timeout: float = 30.0


@dataclass(frozen=True)
class SdeiSettings:
    events: tuple[EventSpec, ...] = ()
    profile: str = "tf-a"
    bind_slots: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class ConduitSettings:
    """How the sidecar reaches the guest (the gdbstub conduit)."""

    #: False: QMP-only (versions, lifecycle, state), no guest traps
    enabled: bool = False
    #: gdbstub address "tcp:HOST:PORT"; empty means the sidecar starts one over QMP on a free port
    gdb: str = ""
    #: bare-metal guest ELF whose hvc/smc sites are trapped
    elf: Path | None = None
    #: Linux kernel Image whose SDEI/PSCI call sites are trapped (its KASLR offset is followed at run time)
    kernel: Path | None = None
    #: extra guest addresses to trap
    trap_sites: tuple[int, ...] = ()
    #: start a VM that QEMU holds in prelaunch (-S) once the traps are armed; otherwise wait for
    #: its owner's QMP cont (a VM someone else paused is never resumed by the sidecar)
    start_vm: bool = False
    #: answer the EL2 stub's calls through its mailbox in shared guest RAM, without stopping the VM,
    #: when QEMU's RAM is a shared memory backend (qemu-args prints one); False: every call stops it
    mailbox: bool = True
    #: QEMU's guest RAM file (memory-backend-file,mem-path=...,share=on) for the mailbox; unset:
    #: the sidecar finds QEMU's shared RAM among its open files (/proc/<pid>/fd)
    guest_ram: Path | None = None


@dataclass(frozen=True)
class MqttSettings:
    """The MQTT v5 control transport; absent (``None`` in :class:`Config`) when not configured."""

    #: broker host and port; ``tls`` for ``mqtts://``
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    #: CA bundle to verify the broker with (default: the system's), client certificate and key
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    #: default: ``qmp-sdei-<vm name>``
    client_id: str | None = None
    topic_prefix: str = "qmp-sdei/v1"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(text: str, key: str = "mqtt.url") -> tuple[str, int, bool]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (host, port, tls). :raise ConfigError:"""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"{key}: {text!r} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    tls = scheme == "mqtts"
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon:
        host, port = rest.rstrip("/"), str(8883 if tls else 1883)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host or "@" in host:
        raise ConfigError(f"{key}: {text!r} is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    return host, int(port), tls


def _valid_topic_prefix(value: str) -> str | None:
    if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "+#\0"):
        return "must be a non-empty topic path without wildcards or leading/trailing '/'"
    return None


#: How a migration carries the SDEI state: inside QEMU's stream, over the control API, or the first
#: when this QEMU can (it has the ``dbus-vmstate`` object type), else the second.
MIGRATION_TRANSPORTS = ("auto", "dbus-vmstate", "control")


@dataclass(frozen=True)
class MigrationPeer:
    """Where the destination sidecar of a control-transport migration takes the state.

    ``unix``: its local control socket (same host). ``mqtt``: its ``incoming`` topic on this
    sidecar's own broker (``[mqtt]``), under the destination VM's name (``vm``; ``None``: ours).
    """

    kind: str  # "unix" | "mqtt"
    path: Path | None = None
    vm: str | None = None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"mqtt:{self.vm}" if self.vm else "mqtt"


def parse_peer(text: str, key: str = "migration.peer") -> MigrationPeer:
    """``unix:PATH`` (or an absolute PATH), ``mqtt`` or ``mqtt:VM NAME``. :raise ConfigError:"""
    if text == "mqtt" or text.startswith("mqtt:"):
        vm = text[5:] or None
        if vm is not None and any(c in vm for c in "/+#\0"):
            raise ConfigError(f"{key}: {vm!r} cannot be an MQTT topic level (no '/', '+', '#', NUL)")
        return MigrationPeer("mqtt", vm=vm)
    path = text.removeprefix("unix:")
    if not path.startswith("/"):
        raise ConfigError(f"{key}: {text!r} is not unix:/ABSOLUTE/PATH, mqtt or mqtt:VM")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise ConfigError(f"{key}: {path!r} is longer than a unix socket path may be ({UNIX_PATH_MAX} bytes)")
    return MigrationPeer("unix", path=Path(path))


@dataclass(frozen=True)
class MigrationSettings:
    """How the SDEI state travels with a live migration (``docs/migration.md``)."""

    transport: str = "auto"
    #: the destination's control endpoint (control transport; a ``migrate`` request may name another)
    peer: MigrationPeer | None = None
    #: seconds the destination sidecar has to acknowledge the state (the guest is stopped meanwhile)
    peer_timeout: float = 3.0
    #: migrations this sidecar starts to a ``tcp:`` URI go over a socket it connects with
    #: ``TCP_NODELAY`` and hands to QEMU (``docs/migration.md``, "Downtime")
    tcp_nodelay: bool = True


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    qmp: QmpSettings
    state_dir: Path
    name: str | None = None
    versions: VersionRequest = field(default_factory=VersionRequest)
    sdei: SdeiSettings = field(default_factory=SdeiSettings)
    conduit: ConduitSettings = field(default_factory=ConduitSettings)
    log: LogSettings = field(default_factory=LogSettings)
    mqtt: MqttSettings | None = None
    metrics: MetricsSettings | None = None
    migration: MigrationSettings = field(default_factory=MigrationSettings)
    source: Path | None = None

    def runtime_changes(self, new: Config) -> tuple[list[str], list[str]]:
        """Compare with a re-read config: (keys that may change at run time, keys that may not)."""
        allowed, refused = [], []
        if new.log != self.log:
            allowed.append("log")
        for key in ("qmp", "state_dir", "name", "versions", "sdei", "conduit", "mqtt", "metrics", "migration"):
            if getattr(new, key) != getattr(self, key):
                refused.append(key)
        return allowed, refused


# -- reading -------------------------------------------------------------------------------------------


class _Table:
    """A TOML table with its key path, for error messages, and a record of keys read."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'}: must be a table")
        self.data, self.path, self.seen = data, path, set[str]()

    def key(self, name: str) -> str:
        shown = name if _BARE_KEY.fullmatch(name) else json.dumps(name)  # a key may hold any character
        return f"{self.path}.{shown}" if self.path else shown

    def get(
        self,
        name: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        check: Callable[[Any], str | None] | None = None,
    ) -> T:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.key(name)}: expected {_names(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.key(name)}: expected {_names(kinds)}, got {type(value).__name__} {value!r}")
        if isinstance(value, str) and "\0" in value:
            raise ConfigError(f"{self.key(name)}: contains a NUL character")
        if check is not None and (problem := check(value)):
            raise ConfigError(f"{self.key(name)}: {problem}")
        return value  # type: ignore[return-value]

    def table(self, name: str) -> _Table:
        self.seen.add(name)
        return _Table(self.data.get(name, {}), self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


def _names(kinds: tuple[type, ...]) -> str:
    words = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(words.get(k, k.__name__) for k in kinds)


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"{v!r} is not one of {', '.join(choices)}"


def parse_tcp(text: str, key: str) -> tuple[str, int]:
    """``"tcp:HOST:PORT"`` -> ``(HOST, PORT)``; IPv6 hosts may be bracketed. :raise ConfigError:"""
    host, _, port = text.removeprefix("tcp:").rpartition(":")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    if not text.startswith("tcp:") or not host or not _is_port(port):
        raise ConfigError(f"{key}: {text!r} is not tcp:HOST:PORT")
    return host, int(port)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


def _parse_address(text: str) -> str | tuple[str, int]:
    if text.startswith("tcp:"):
        return parse_tcp(text, "qmp.socket")
    if text.startswith("unix:"):
        text = text[5:]
    if not text:
        raise ConfigError("qmp.socket: is empty")
    if len(text.encode()) > UNIX_PATH_MAX:
        raise ConfigError(f"qmp.socket: {text!r} is longer than a unix socket path may be ({UNIX_PATH_MAX} bytes)")
    return text


def _is_tcp(text: str) -> bool:
    try:
        parse_tcp(text, "")
    except ConfigError:
        return False
    return True


def _positive_seconds(value: float) -> str | None:
    if not math.isfinite(value):
        return "must be a finite number of seconds"
    return None if value > 0 else "must be positive"


def _parse_event(raw: Any, path: str) -> EventSpec:
    t = _Table(raw, path)
    number = t.get(
        "number", int, -1, lambda n: None if 0 <= n <= 0x7FFF_FFFF else "must be 0..0x7fffffff (bit 31 clear)"
    )
    if number < 0:
        raise ConfigError(f"{path}.number: is required")
    if number in DYNAMIC_RANGE:
        raise ConfigError(
            f"{path}.number: {number:#x} is in the range reserved for INTERRUPT_BIND slots "
            f"({DYNAMIC_RANGE.start:#x}..{DYNAMIC_RANGE.stop - 1:#x})"
        )
    kind = t.get("type", str, "private", _one_of("private", "shared"))
    priority = t.get("priority", str, "normal", _one_of("normal", "critical"))
    name = t.get("name", str, None)
    t.done()
    return EventSpec(number, shared=kind == "shared", critical=priority == "critical", name=name)


def _parse_mqtt(mqtt: _Table) -> MqttSettings | None:
    if not mqtt.data:
        return None
    url = mqtt.get("url", str, "")
    if not url:
        raise ConfigError("mqtt.url: is required when [mqtt] is present (mqtt://HOST:PORT)")
    host, port, tls = parse_mqtt_url(url)
    paths = {k: mqtt.get(k, str, "") for k in ("ca", "cert", "key")}
    mqtt_settings = MqttSettings(
        host=host,
        port=port,
        tls=tls,
        username=mqtt.get("username", str, None),
        password=mqtt.get("password", str, None),
        ca=Path(paths["ca"]) if paths["ca"] else None,
        cert=Path(paths["cert"]) if paths["cert"] else None,
        key=Path(paths["key"]) if paths["key"] else None,
        client_id=mqtt.get("client_id", str, None),
        topic_prefix=mqtt.get("topic_prefix", str, "qmp-sdei/v1", _valid_topic_prefix),
    )
    if (mqtt_settings.cert is None) != (mqtt_settings.key is None):
        raise ConfigError("mqtt.cert, mqtt.key: give both or neither")
    if not tls and (mqtt_settings.ca or mqtt_settings.cert):
        raise ConfigError("mqtt.ca, mqtt.cert: TLS settings need an mqtts:// url")
    mqtt.done()
    return mqtt_settings


def _parse_log(log: _Table) -> LogSettings:
    settings = LogSettings(
        level=log.get("level", str, "info", _one_of(*LOG_LEVELS)),
        format=log.get("format", str, "text", _one_of(*LOG_FORMATS)),
    )
    log.done()
    return settings


def _parse_migration(table: _Table, *, has_mqtt: bool) -> MigrationSettings:
    transport = table.get("transport", str, "auto", _one_of(*MIGRATION_TRANSPORTS))
    peer_text = table.get("peer", str, "")
    peer = parse_peer(peer_text) if peer_text else None
    if peer is not None and peer.kind == "mqtt" and not has_mqtt:
        raise ConfigError("migration.peer: an MQTT peer is reached through this sidecar's broker; configure [mqtt]")
    timeout = float(table.get("peer_timeout", (int, float), 3.0, _positive_seconds))
    nodelay = table.get("tcp_nodelay", bool, True)
    table.done()
    return MigrationSettings(transport=transport, peer=peer, peer_timeout=timeout, tcp_nodelay=nodelay)


def parse(data: dict[str, Any], *, source: Path | None = None) -> Config:
    """Validate an already-decoded TOML document. :raise ConfigError:"""
    root = _Table(data, "")
    vm = root.table("vm")
    name = vm.get("name", str, None)
    state_dir_text = vm.get("state_dir", str, "")
    vm.done()

    qmp = root.table("qmp")
    socket_text = qmp.get("socket", str, "")
    if not socket_text:
        raise ConfigError("qmp.socket: is required (a unix socket path or tcp:HOST:PORT)")
    qmp_settings = QmpSettings(
        address=_parse_address(socket_text),
        mode=qmp.get("mode", str, "connect", _one_of("connect", "listen")),
        timeout=float(qmp.get("timeout", (int, float), 30.0, _positive_seconds)),
    )
    qmp.done()

    sdei = root.table("sdei")
    sdei_version = sdei.get("version", str, "latest")
    vendor = sdei.get("vendor", int, 0, lambda v: None if 0 <= v <= 0xFFFF_FFFF else "must fit in 32 bits")
    profile = sdei.get("profile", str, "tf-a", _one_of(*PROFILES))
    slots = sdei.get(
        "bind_slots",
        list,
        [0, 0],
        lambda v: (
            None
            if len(v) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 0xFFFF for n in v)
            else "must be [private, shared] with counts 0..65535"
        ),
    )
    raw_events = sdei.get("events", list, [])
    events = tuple(_parse_event(raw, f"sdei.events[{i}]") for i, raw in enumerate(raw_events))
    seen: dict[int, int] = {}
    for i, spec in enumerate(events):
        if spec.number in seen:
            raise ConfigError(
                f"sdei.events[{i}].number: event {spec.number} is already declared at sdei.events[{seen[spec.number]}]"
            )
        if spec.number == 0 and (spec.shared or spec.critical):
            raise ConfigError(f"sdei.events[{i}]: event 0 is always private and normal priority")
        seen[spec.number] = i
    sdei.done()

    psci = root.table("psci")
    psci_version = psci.get("version", str, "auto")
    psci.done()
    request = VersionRequest(sdei=sdei_version, sdei_vendor=vendor, psci=psci_version)
    try:
        request.validate()
    except VersionError as err:
        key = "sdei.version" if "SDEI" in str(err) else "psci.version"
        raise ConfigError(f"{key}: {err}") from err

    conduit = root.table("conduit")
    elf = conduit.get("elf", str, "")
    kernel = conduit.get("kernel", str, "")
    guest_ram = conduit.get(
        "guest_ram",
        str,
        "",
        lambda v: None if v == "" or v.startswith("/") else "must be an absolute path",
    )
    sites = conduit.get(
        "trap_sites",
        list,
        [],
        lambda v: (
            None
            if all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 1 << 64 and a % 4 == 0 for a in v)
            else "must list 4-byte-aligned 64-bit addresses"
        ),
    )
    conduit_settings = ConduitSettings(
        enabled=conduit.get("enabled", bool, False),
        gdb=conduit.get("gdb", str, "", lambda v: None if v == "" or _is_tcp(v) else "must be tcp:HOST:PORT"),
        elf=Path(elf) if elf else None,
        kernel=Path(kernel) if kernel else None,
        trap_sites=tuple(sites),
        start_vm=conduit.get("start_vm", bool, False),
        mailbox=conduit.get("mailbox", bool, True),
        guest_ram=Path(guest_ram) if guest_ram else None,
    )
    conduit.done()

    mqtt_settings = _parse_mqtt(root.table("mqtt"))
    metrics_settings = parse_metrics_table(root.table("metrics").data)
    migration_settings = _parse_migration(root.table("migration"), has_mqtt=mqtt_settings is not None)
    log_settings = _parse_log(root.table("log"))
    root.done()

    if not state_dir_text and name and ("/" in name or name in (".", "..")):
        raise ConfigError(f"vm.name: {name!r} cannot name the default state directory; set vm.state_dir")
    state_dir = Path(state_dir_text) if state_dir_text else DEFAULT_STATE_ROOT / (name or "default")
    return Config(
        qmp=qmp_settings,
        state_dir=state_dir,
        name=name,
        versions=request,
        sdei=SdeiSettings(events=events, profile=profile, bind_slots=(slots[0], slots[1])),
        conduit=conduit_settings,
        log=log_settings,
        mqtt=mqtt_settings,
        metrics=metrics_settings,
        migration=migration_settings,
        source=source,
    )


def load(path: Path | str) -> Config:
    """Read and validate a config file. :raise ConfigError: unreadable, not TOML, or invalid."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from err
    return parse(data, source=path)
