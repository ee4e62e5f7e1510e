"""``qmp-sdei`` command line.

Subcommands::

    qmp-sdei run --config vm1.toml [--log-format json] [--log-level debug]
    qmp-sdei status (--config vm1.toml | --state-dir DIR | --mqtt URL --vm NAME) [--json]
    qmp-sdei raise (--config vm1.toml | --mqtt URL --vm NAME) --event N [--vcpu I] [--json]
    qmp-sdei watch (--config vm1.toml | --mqtt URL --vm NAME) [--json]
    qmp-sdei migrate (--config vm1.toml | --mqtt URL --vm NAME) --uri tcp:HOST:PORT [--peer PEER] [--json]
    qmp-sdei check-config vm1.toml
    qmp-sdei boot-test --kernel IMAGE [--expect-sdei 1.1 --expect-psci 1.0] [--smp N] [--cpu MODEL]
                       [--conduit el2|symbols] [--append ARGS] [--initrd FILE] [--console FILE] [--json]
    qmp-sdei qemu-args (--kernel IMAGE | --firmware uefi [--acpi]) --dtb-out FILE [--initrd FILE] [--append ARGS]
                       [--smp N] [--cpu MODEL] [--memory MB] [--guest-ram FILE]
    qmp-sdei version

Errors the user can act on print one line to stderr and exit with the code their class carries
(:class:`qmp_sdei.errors.ExitCode`, documented in the README); anything else is a bug, logged with
its traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qmp_sdei import __version__
from qmp_sdei.config import Config, load, parse_mqtt_url
from qmp_sdei.control.commands import PROTOCOL_VERSION
from qmp_sdei.control.local import LocalControlClient, socket_path
from qmp_sdei.daemon import Sidecar
from qmp_sdei.errors import ConfigError, ControlError, ExitCode, IncompatibleState, SdeiError
from qmp_sdei.logs import configure_logging
from qmp_sdei.statefile import StateStore

log = logging.getLogger("qmp_sdei.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmp-sdei", description="SDEI/PSCI sidecar for QEMU aarch64 VMs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="attach to a QEMU and serve its guest until QEMU exits")
    run.add_argument("--config", required=True, type=Path, help="the VM's TOML config")
    run.add_argument("--log-format", choices=("text", "json"), help="override [log] format")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="override [log] level")

    status = sub.add_parser("status", help="ask a running sidecar what it knows (else its last status.json)")
    where = _add_target(status)
    where.add_argument("--state-dir", type=Path, help="read status.json from this state directory")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    _add_control_commands(sub)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", type=Path)

    boot = sub.add_parser("boot-test", help="boot a Linux kernel with the sidecar and check its SDEI/PSCI lines")
    boot.add_argument("--kernel", required=True, type=Path, help="arm64 Image (e.g. Debian's vmlinuz-*-arm64)")
    boot.add_argument("--expect-sdei", default="1.1", help="SDEI version to pin and expect (default 1.1)")
    boot.add_argument("--expect-psci", default="1.1", help="PSCI version to pin and expect (default 1.1)")
    boot.add_argument("--smp", type=int, default=1)
    boot.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the console lines")
    boot.add_argument("--json", action="store_true", help="print the report as JSON")
    boot.add_argument(
        "--firmware",
        default="direct",
        choices=("direct", "uefi"),
        help="direct: the stub enters the kernel; uefi: the stub enters UEFI, which boots the kernel from a disk",
    )
    boot.add_argument(
        "--conduit",
        default="el2",
        choices=("el2", "symbols"),
        help="el2: through the shipped EL2 stub, kernel defaults (default); symbols: kernel call sites, nokaslr",
    )
    boot.add_argument(
        "--acpi", action="store_true", help="with --firmware uefi: boot with ACPI (SDEI from our ACPI table), not DT"
    )
    boot.add_argument("--append", help="kernel command line (default: the kernel's defaults plus a console)")
    boot.add_argument("--initrd", type=Path, help="initrd to boot with")
    boot.add_argument("--cpu", default="cortex-a57", help="QEMU CPU model (default cortex-a57)")
    boot.add_argument("--console", type=Path, help="write the whole guest console to this file")

    qargs = sub.add_parser(
        "qemu-args", help="write the SDEI DTB and print the QEMU arguments that boot a kernel through the EL2 stub"
    )
    qargs.add_argument("--kernel", type=Path, help="arm64 Image to boot (direct boot)")
    qargs.add_argument(
        "--firmware",
        default="direct",
        choices=("direct", "uefi"),
        help="uefi: the stub enters Debian's QEMU_EFI.fd; add your disk and -device virtio-rng-pci",
    )
    qargs.add_argument(
        "--acpi", action="store_true", help="with --firmware uefi: ACPI boot (run sdeitab.efi before the OS loader)"
    )
    qargs.add_argument("--dtb-out", required=True, type=Path, help="where to write the guest's DTB")
    qargs.add_argument("--initrd", type=Path)
    qargs.add_argument("--append", default="console=ttyAMA0", help="kernel command line")
    qargs.add_argument("--smp", type=int, default=1)
    qargs.add_argument("--cpu", default="cortex-a57")
    qargs.add_argument("--memory", type=int, default=1024, help="MiB")
    qargs.add_argument("--psci", default="1.1", help="PSCI version the DTB advertises (match [psci] version)")
    qargs.add_argument(
        "--guest-ram",
        metavar="FILE",
        help="keep guest RAM in this file (memory-backend-file; match [conduit] guest_ram) instead of a memfd",
    )

    sub.add_parser("version", help="print the version")
    return parser


def _add_control_commands(sub: Any) -> None:
    """raise, migrate and watch: commands that talk to a running sidecar."""
    raise_ = sub.add_parser("raise", help="raise an SDEI event in the guest through the running sidecar")
    _add_target(raise_)
    raise_.add_argument("--event", required=True, type=_event_number, help="event number from the catalogue")
    raise_.add_argument("--vcpu", type=int, help="vCPU index (private events); shared events are routed")
    raise_.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the handler entry (default 5)")
    raise_.add_argument("--json", action="store_true", help="print the sidecar's reply as JSON")

    migrate = sub.add_parser("migrate", help="live-migrate the VM, SDEI state included, to a listening destination")
    _add_target(migrate)
    migrate.add_argument("--uri", required=True, help="where the destination QEMU listens, e.g. tcp:HOST:PORT")
    migrate.add_argument(
        "--peer",
        help="the destination sidecar's control endpoint when the state travels over the control API "
        "(no dbus-vmstate): unix:/STATE_DIR/control.sock, mqtt or mqtt:VM (default: migration.peer)",
    )
    migrate.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the outcome")
    migrate.add_argument("--json", action="store_true", help="print the report as JSON")

    watch = sub.add_parser("watch", help="print the sidecar's notifications until interrupted")
    _add_target(watch)
    watch.add_argument("--json", action="store_true", help="one JSON document per line")


def _event_number(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an event number") from None
    if not 0 <= value <= 0x7FFF_FFFF:
        raise argparse.ArgumentTypeError(f"{text}: event numbers are 0..0x7fffffff")
    return value


def _add_target(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--config (the local socket of that VM's sidecar) or --mqtt URL --vm NAME (through the broker)."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the VM's TOML config: talk to its sidecar's local socket")
    where.add_argument("--mqtt", metavar="URL", help="mqtt://HOST:PORT or mqtts://...: go through the broker")
    parser.add_argument("--vm", help="the VM's name (with --mqtt)")
    parser.add_argument("--username", help="broker user (with --mqtt)")
    parser.add_argument("--password-file", type=Path, help="file holding the broker password (with --mqtt)")
    parser.add_argument("--ca", type=Path, help="CA bundle to verify the broker (mqtts)")
    parser.add_argument("--cert", type=Path, help="client certificate (mqtts)")
    parser.add_argument("--key", type=Path, help="client key (mqtts)")
    parser.add_argument("--topic-prefix", default="qmp-sdei/v1", help="topic prefix (default qmp-sdei/v1)")
    return where


def _control_client(args: argparse.Namespace) -> Any:
    """The client for the chosen transport (an async context manager with request/watch/status)."""
    if args.mqtt is None:
        return LocalControlClient(socket_path(load(args.config).state_dir))
    if not args.vm:
        raise ConfigError("--vm: is required with --mqtt")
    parse_mqtt_url(args.mqtt, "--mqtt")
    from qmp_sdei.control.mqtt import MqttControlClient  # noqa: PLC0415 (only this path needs aiomqtt)

    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"--password-file: cannot read {args.password_file}: {err.strerror}") from err
    return MqttControlClient(
        args.mqtt, args.vm, username=args.username, password=password, ca=args.ca, cert=args.cert, key=args.key,
        topic_prefix=args.topic_prefix,
    )  # fmt: skip


def _cmd_raise(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"v": PROTOCOL_VERSION, "command": "raise", "event": args.event, "wait": args.wait}
    if args.vcpu is not None:
        request["vcpu"] = args.vcpu

    async def ask() -> dict[str, Any]:
        async with _control_client(args) as client:
            answer: dict[str, Any] = await client.request(request, timeout=args.wait + 10)
            return answer

    answer = asyncio.run(ask())
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    if not answer.get("ok"):
        error = answer.get("error", {})
        if not args.json:
            print(f"qmp-sdei: the sidecar refused the request ({error.get('code')}): {error.get('message')}")
        return 1
    result = answer["result"]
    if not args.json:
        print(_raise_text(result))
    return 1 if result["result"] == "refused" else 0


def _raise_text(result: dict[str, Any]) -> str:
    where = f" on vCPU {result['vcpu']}" if result.get("vcpu") is not None else ""
    head = f"event {result['event']}{where}: {result['result']}"
    if result["result"] == "delivered":
        latency = result.get("latency_us")
        return head + (f" (handler entered after {latency / 1e3:.2f} ms)" if latency is not None else "")
    return f"{head} ({result.get('code')}): {result.get('reason')}"


def _cmd_migrate(args: argparse.Namespace) -> int:
    request = {"v": PROTOCOL_VERSION, "command": "migrate", "uri": args.uri}
    if args.peer:
        request["peer"] = args.peer

    async def ask() -> dict[str, Any]:
        async with _control_client(args) as client:
            answer: dict[str, Any] = await client.request(request, timeout=args.timeout)
            return answer

    answer = asyncio.run(ask())
    if not answer.get("ok"):
        error = answer.get("error", {})
        print(f"qmp-sdei: migration refused ({error.get('code')}): {error.get('message')}", file=sys.stderr)
        return 1
    report = answer["result"]
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for phase in report["phases"]:
            print(f"{phase['at_ms']:>9.1f} ms  {phase['phase']}")
        print(f"outcome   {report['outcome']}  total {report['total_ms']} ms, downtime {report['downtime_ms']} ms")
        if report.get("connection"):
            print(f"stream    {report['connection']}")
        if report.get("error"):
            print(f"error     {report['error']}")
    return 0 if report["outcome"] == "completed" else 1


def _cmd_watch(args: argparse.Namespace) -> int:
    async def follow() -> None:
        async with _control_client(args) as client:
            async for item in client.watch():
                print(json.dumps(item, sort_keys=True) if args.json else _notification_text(item), flush=True)

    asyncio.run(follow())
    print("qmp-sdei: the sidecar went away", file=sys.stderr)
    return ExitCode.UNREACHABLE


def _notification_text(item: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(float(item.get("time", 0))))
    fields = " ".join(f"{k}={v}" for k, v in sorted(item.items()) if k not in ("v", "kind", "time"))
    return f"{stamp} {item.get('kind', '?'):<22} {fields}".rstrip()


def _cmd_run(args: argparse.Namespace) -> int:
    config = load(args.config)
    configure_logging(args.log_level or config.log.level, args.log_format or config.log.format)
    sidecar = Sidecar(config)

    def early_shutdown(signum: int, _frame: object) -> None:
        sidecar.request_shutdown_from_signal(signal.Signals(signum).name)  # it must not log

    # Until the sidecar's event loop handles them, a shutdown signal is recorded (and the sidecar
    # leaves at once, saying what it left undone) rather than killing the process silently.
    previous = {sig: signal.signal(sig, early_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.debug("run: %s", args.config)
        asyncio.run(preflight(config))  # what check-config checks, refused before QEMU is involved
        return int(asyncio.run(sidecar.run()))
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: not installed from Python; nothing to put back
                signal.signal(sig, handler)


async def preflight(config: Config) -> list[int]:
    """Every check of ``config`` that needs no QEMU; changes nothing. Returns the trap sites.

    :raise ConfigError: the state directory cannot be used, a listening socket's directory is
        missing, or a guest image gives no trap sites (the message names the path).
    :raise IncompatibleState: the state directory holds a damaged state file.
    """
    store = StateStore(config.state_dir)
    store.check_usable()
    store.load()
    qmp = config.qmp
    if qmp.mode == "listen" and isinstance(qmp.address, str):
        folder = Path(qmp.address).parent
        if not folder.is_dir():
            raise ConfigError(f"qmp.socket: cannot listen at {qmp.address}: {folder} is not a directory")
    conduit = config.conduit
    if not conduit.enabled or not (conduit.elf or conduit.kernel or conduit.trap_sites):
        # Nothing configured to trap: fine for a guest booted through the EL2 stub (found at
        # attach); any other guest is refused then, with the same error find_trap_sites gives.
        return []
    from qmp_sdei.conduit.service import find_trap_sites  # noqa: PLC0415 (optional subsystem)

    return await find_trap_sites(conduit)


def _live_status(args: argparse.Namespace) -> dict[str, Any] | None:
    """Ask the running sidecar; None when none is listening (local) -- MQTT errors propagate."""

    async def ask() -> dict[str, Any] | None:
        async with _control_client(args) as client:
            answer: dict[str, Any] = await client.request({"v": PROTOCOL_VERSION, "command": "status"})
        if not answer.get("ok"):
            raise ControlError(f"the sidecar refused status: {answer.get('error')}")
        result: dict[str, Any] = answer["result"]
        return result

    try:
        return asyncio.run(ask())
    except ControlError:
        if args.mqtt is not None:
            raise
        return None


def _cmd_status(args: argparse.Namespace) -> int:
    if args.config is not None or args.mqtt is not None:
        live = _live_status(args)
        if live is not None:
            live["alive"] = True
            live["source"] = "live"
            _print_status(live, args.json, "the sidecar's status")
            return 0
    state_dir = load(args.config).state_dir if args.config else args.state_dir
    store = StateStore(state_dir)
    doc = store.read_status()
    doc["alive"] = store.writer_alive()
    doc["source"] = str(store.status_path)
    if args.config is not None:
        print(f"qmp-sdei: no sidecar answers on {socket_path(state_dir)}; its last status.json:", file=sys.stderr)
    _print_status(doc, args.json, str(store.status_path))
    return 0


def _print_status(doc: dict[str, Any], as_json: bool, source: str) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    reader = _StatusReader(doc)
    print(_status_text(reader))
    if reader.problems:
        # Show what could be read, then say which part of the document made no sense.
        raise IncompatibleState(f"{source}: unexpected content: {'; '.join(reader.problems[:3])}")


class _StatusReader:
    """Typed reads from a ``status.json`` some sidecar wrote: a missing key shows as ``-``, a value
    of the wrong type as ``?`` and is noted in :attr:`problems` (never a traceback)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.problems: list[str] = []

    def get(self, path: str, kind: type | tuple[type, ...], base: Any = None, where: str = "") -> Any:
        """The value at the dotted ``path`` (under ``base``, found at ``where``; default the whole
        document), or None if it is missing or of the wrong type."""
        value: Any = self.doc if base is None else base
        walked = [where] if where else []
        for key in path.split("."):
            if not isinstance(value, dict):
                self.note(f"{'.'.join(walked) or 'the document'}: expected an object, found {_short(value)}")
                return None
            if key not in value:
                return None
            value = value[key]
            walked.append(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if value is None:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.note(f"{'.'.join(walked)}: unexpected {_short(value)}")
            return None
        return value

    def note(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


def _short(value: Any) -> str:
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= 40 else text[:37] + "..."


def _show(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _status_text(r: _StatusReader) -> str:
    alive = r.get("alive", bool) is True
    updated = r.get("updated", (int, float))
    age = f"status {time.time() - updated:.0f}s old" if updated is not None else "status age unknown"
    last = "" if alive else f", last: {_show(r.get('shutdown_reason', str))}"
    lines = [
        f"sidecar   {'running' if alive else 'not running'} (pid {_show(r.get('sidecar.pid', int))}, {age}){last}",
        f"vm        {r.get('vm.name', str) or '-'} uuid {r.get('vm.uuid', str) or '-'}"
        f"  runstate {_show(r.get('vm.runstate', str))}",
        f"qemu      {_show(r.get('vm.qemu', str))}  {_show(r.get('vm.machine', str))}"
        f"  gic {_show(r.get('vm.gic_version', (int, str)))}  psci via {_show(r.get('vm.psci_conduit', str))}",
        f"versions  SDEI {_show(r.get('pins.sdei', str))} (vendor {_show(r.get('pins.sdei_vendor', int), '#x')}),"
        f" PSCI {_show(r.get('pins.psci', str))} (pinned)",
        f"profile   {_show(r.get('sdei.profile', str))}",
    ]
    for position, vcpu in enumerate(r.get("sdei.vcpus", list) or []):
        lines.append(_vcpu_line(r, vcpu, f"sdei.vcpus[{position}]"))
    shared = r.get("sdei.shared", dict) or {}
    if shared:
        lines.append(f"shared    {_events_text(r, shared, 'sdei.shared')}")
    pending = r.get("sdei.pending", list)
    if pending:
        lines.append(f"pending   {pending}")
    counters = r.get("counters", dict) or {}
    lines.append("counters  " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    for problem in r.get("problems", list) or []:
        lines.append(f"PROBLEM   {problem}")
    return "\n".join(lines)


def _vcpu_line(r: _StatusReader, vcpu: Any, where: str) -> str:
    if not isinstance(vcpu, dict):
        r.note(f"{where}: expected an object, found {_short(vcpu)}")
        return "vcpu ?"
    index = r.get("index", int, vcpu, where)
    masked = r.get("masked", bool, vcpu, where)
    running = r.get("running", list, vcpu, where)
    mask = "?" if masked is None else "masked" if masked else "unmasked"
    events = _events_text(r, r.get("events", dict, vcpu, where) or {}, f"{where}.events") or "none registered"
    return (
        f"vcpu {_show(index):<4} mpidr {_show(r.get('mpidr', int, vcpu, where), '#x')} {mask}"
        f"{f' running {running}' if running else ''}; {events}"
    )


def _events_text(r: _StatusReader, events: dict[str, Any], where: str) -> str:
    return ", ".join(f"{n}:{_show(r.get('state', str, entry, f'{where}.{n}'))}" for n, entry in events.items())


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load(args.config)
    sites = asyncio.run(preflight(config))
    traps = ""
    if config.conduit.enabled:
        traps = f", {len(sites)} trap site(s)" if sites else ", no trap sites: the guest must boot through the EL2 stub"
    events = {spec.number for spec in config.sdei.events} | {0}  # event 0 always exists, as in run
    print(f"{args.config}: ok ({len(events)} event(s){traps}, state in {config.state_dir})")
    return ExitCode.OK


def _cmd_boot_test(args: argparse.Namespace) -> int:
    from qmp_sdei.boottest import run_boot_test  # noqa: PLC0415 (pulls in the Linux tooling)

    configure_logging("warning", "text")
    report = asyncio.run(
        run_boot_test(
            args.kernel,
            expect_sdei=args.expect_sdei,
            expect_psci=args.expect_psci,
            smp=args.smp,
            timeout=args.timeout,
            firmware=args.firmware,
            conduit=args.conduit,
            append=args.append,
            initrd=args.initrd,
            cpu=args.cpu,
            console=args.console,
            acpi=args.acpi,
        )
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.passed else 1


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    from qmp_sdei.boottest import stub_boot_args  # noqa: PLC0415 (pulls in the DTB tooling)

    argv = asyncio.run(
        stub_boot_args(
            args.kernel,
            args.dtb_out,
            firmware=args.firmware,
            acpi=args.acpi,
            initrd=args.initrd,
            append=args.append,
            smp=args.smp,
            cpu=args.cpu,
            memory_mb=args.memory,
            psci=args.psci,
            guest_ram=args.guest_ram,
        )
    )
    print(shlex.join(argv))
    return 0


#: characters that would break an error message over lines (what str.splitlines() splits on)
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def _one_line(text: str) -> str:
    """An error message on one line, whatever a path or value in it contains."""
    return "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in text)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "status": _cmd_status,
    "check-config": _cmd_check_config,
    "raise": _cmd_raise,
    "migrate": _cmd_migrate,
    "watch": _cmd_watch,
    "boot-test": _cmd_boot_test,
    "qemu-args": _cmd_qemu_args,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"qmp-sdei {__version__}")
            code: int = ExitCode.OK
        else:
            code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that went away shows up here, not at interpreter exit
    except SdeiError as err:
        print(f"qmp-sdei: {_one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # ``qmp-sdei status | head -1``: the reader has what it wanted. Nothing more may reach the
        # closed pipe, or Python reports it again while flushing at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except KeyboardInterrupt:
        return ExitCode.OK
    except Exception:
        log.exception("internal error (a bug: please report it with this traceback)")
        return ExitCode.INTERNAL
    return code


if __name__ == "__main__":
    sys.exit(main())
