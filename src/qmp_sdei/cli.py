"""``qmp-sdei`` command line.

Subcommands::

    qmp-sdei run --config vm1.toml [--log-format json] [--log-level debug]
    qmp-sdei status (--config vm1.toml | --state-dir DIR | --mqtt URL --vm NAME) [--json]
    qmp-sdei raise (--config vm1.toml | --mqtt URL --vm NAME) --event N [--vcpu I] [--json]
    qmp-sdei watch (--config vm1.toml | --mqtt URL --vm NAME) [--json]
    qmp-sdei migrate (--config vm1.toml | --mqtt URL --vm NAME) --uri tcp:HOST:PORT [--json]
    qmp-sdei check-config vm1.toml
    qmp-sdei boot-test --kernel IMAGE [--expect-sdei 1.1 --expect-psci 1.0] [--smp N] [--cpu MODEL]
                       [--conduit el2|symbols] [--append ARGS] [--initrd FILE] [--console FILE] [--json]
    qmp-sdei qemu-args --kernel IMAGE --dtb-out FILE [--initrd FILE] [--append ARGS] [--smp N] [--cpu MODEL]
    qmp-sdei version

Errors the user can act on print one line to stderr and exit with a documented code
(:class:`qmp_sdei.daemon.ExitCode`); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qmp_sdei import __version__
from qmp_sdei.config import load, parse_mqtt_url
from qmp_sdei.control.commands import PROTOCOL_VERSION
from qmp_sdei.control.local import LocalControlClient, socket_path
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.errors import ConfigError, ControlError, SdeiError
from qmp_sdei.logs import configure_logging
from qmp_sdei.statefile import StateStore


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

    raise_ = sub.add_parser("raise", help="raise an SDEI event in the guest through the running sidecar")
    _add_target(raise_)
    raise_.add_argument("--event", required=True, type=_event_number, help="event number from the catalogue")
    raise_.add_argument("--vcpu", type=int, help="vCPU index (private events); shared events are routed")
    raise_.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the handler entry (default 5)")
    raise_.add_argument("--json", action="store_true", help="print the sidecar's reply as JSON")

    migrate = sub.add_parser("migrate", help="live-migrate the VM, SDEI state included, to a listening destination")
    _add_target(migrate)
    migrate.add_argument("--uri", required=True, help="where the destination QEMU listens, e.g. tcp:HOST:PORT")
    migrate.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the outcome")
    migrate.add_argument("--json", action="store_true", help="print the report as JSON")

    watch = sub.add_parser("watch", help="print the sidecar's notifications until interrupted")
    _add_target(watch)
    watch.add_argument("--json", action="store_true", help="one JSON document per line")

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
    boot.add_argument("--append", help="kernel command line (default: the kernel's defaults plus a console)")
    boot.add_argument("--initrd", type=Path, help="initrd to boot with")
    boot.add_argument("--cpu", default="cortex-a57", help="QEMU CPU model (default cortex-a57)")
    boot.add_argument("--console", type=Path, help="write the whole guest console to this file")

    qargs = sub.add_parser(
        "qemu-args", help="write the SDEI DTB and print the QEMU arguments that boot a kernel through the EL2 stub"
    )
    qargs.add_argument("--kernel", required=True, type=Path, help="arm64 Image to boot")
    qargs.add_argument("--dtb-out", required=True, type=Path, help="where to write the guest's DTB")
    qargs.add_argument("--initrd", type=Path)
    qargs.add_argument("--append", default="console=ttyAMA0", help="kernel command line")
    qargs.add_argument("--smp", type=int, default=1)
    qargs.add_argument("--cpu", default="cortex-a57")
    qargs.add_argument("--memory", type=int, default=1024, help="MiB")
    qargs.add_argument("--psci", default="1.1", help="PSCI version the DTB advertises (match [psci] version)")

    sub.add_parser("version", help="print the version")
    return parser


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
    return int(asyncio.run(Sidecar(config).run()))


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
            _print_status(live, args.json)
            return 0
    state_dir = load(args.config).state_dir if args.config else args.state_dir
    store = StateStore(state_dir)
    doc = store.read_status()
    doc["alive"] = store.writer_alive()
    doc["source"] = str(store.status_path)
    if args.config is not None:
        print(f"qmp-sdei: no sidecar answers on {socket_path(state_dir)}; its last status.json:", file=sys.stderr)
    _print_status(doc, args.json)
    return 0


def _print_status(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(_status_text(doc))


def _status_text(doc: dict[str, Any]) -> str:
    vm = doc.get("vm", {})
    pins = doc.get("pins", {})
    sdei = doc.get("sdei", {})
    age = time.time() - float(doc.get("updated", 0))
    lines = [
        f"sidecar   {'running' if doc['alive'] else 'not running'} (pid {doc['sidecar']['pid']}, "
        f"status {age:.0f}s old){'' if doc['alive'] else ', last: ' + str(doc.get('shutdown_reason'))}",
        f"vm        {vm.get('name') or '-'} uuid {vm.get('uuid') or '-'}  runstate {vm.get('runstate')}",
        f"qemu      {vm.get('qemu')}  {vm.get('machine')}  gic {vm.get('gic_version')}"
        f"  psci via {vm.get('psci_conduit')}",
        f"versions  SDEI {pins.get('sdei')} (vendor {pins.get('sdei_vendor', 0):#x}), PSCI {pins.get('psci')} (pinned)",
        f"profile   {sdei.get('profile')}",
    ]
    for vcpu in sdei.get("vcpus", []):
        events = ", ".join(f"{n}:{e['state']}" for n, e in vcpu["events"].items()) or "none registered"
        running = f" running {vcpu['running']}" if vcpu["running"] else ""
        mask = "masked" if vcpu["masked"] else "unmasked"
        lines.append(f"vcpu {vcpu['index']:<4} mpidr {vcpu['mpidr']:#x} {mask}{running}; {events}")
    shared = ", ".join(f"{n}:{e['state']}" for n, e in sdei.get("shared", {}).items())
    if shared:
        lines.append(f"shared    {shared}")
    if sdei.get("pending"):
        lines.append(f"pending   {sdei['pending']}")
    counters = doc.get("counters", {})
    lines.append("counters  " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    return "\n".join(lines)


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load(args.config)
    events = {spec.number for spec in config.sdei.events} | {0}  # event 0 always exists, as in run
    print(f"{args.config}: ok ({len(events)} event(s), state in {config.state_dir})")
    return 0


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
            initrd=args.initrd,
            append=args.append,
            smp=args.smp,
            cpu=args.cpu,
            memory_mb=args.memory,
            psci=args.psci,
        )
    )
    print(shlex.join(argv))
    return 0


COMMANDS = {
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
    if args.command == "version":
        print(f"qmp-sdei {__version__}")
        return 0
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"qmp-sdei: {err}", file=sys.stderr)
        return ExitCode.CONFIG
    except ControlError as err:
        print(f"qmp-sdei: {err}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except SdeiError as err:
        print(f"qmp-sdei: {err}", file=sys.stderr)
        return ExitCode.STATE
    except KeyboardInterrupt:
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
