"""``qmp-sdei`` command line.

Subcommands::

    qmp-sdei run --config vm1.toml [--log-format json] [--log-level debug]
    qmp-sdei status (--config vm1.toml | --state-dir DIR) [--json]
    qmp-sdei check-config vm1.toml
    qmp-sdei boot-test --kernel IMAGE [--expect-sdei 1.1 --expect-psci 1.0] [--smp N] [--cpu MODEL]
                       [--conduit el2|symbols] [--append ARGS] [--initrd FILE] [--console FILE] [--json]
    qmp-sdei qemu-args (--kernel IMAGE | --firmware uefi [--acpi]) --dtb-out FILE [--initrd FILE] [--append ARGS]
                       [--smp N] [--cpu MODEL] [--memory MB]
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
from qmp_sdei.config import load
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.errors import ConfigError, SdeiError
from qmp_sdei.logs import configure_logging
from qmp_sdei.statefile import StateStore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmp-sdei", description="SDEI/PSCI sidecar for QEMU aarch64 VMs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="attach to a QEMU and serve its guest until QEMU exits")
    run.add_argument("--config", required=True, type=Path, help="the VM's TOML config")
    run.add_argument("--log-format", choices=("text", "json"), help="override [log] format")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="override [log] level")

    status = sub.add_parser("status", help="print what a sidecar knows, from its state directory")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path)
    where.add_argument("--state-dir", type=Path)
    status.add_argument("--json", action="store_true", help="machine-readable output")

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

    sub.add_parser("version", help="print the version")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    config = load(args.config)
    configure_logging(args.log_level or config.log.level, args.log_format or config.log.format)
    return int(asyncio.run(Sidecar(config).run()))


def _cmd_status(args: argparse.Namespace) -> int:
    state_dir = load(args.config).state_dir if args.config else args.state_dir
    store = StateStore(state_dir)
    doc = store.read_status()
    doc["alive"] = store.writer_alive()
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(_status_text(doc))
    return 0


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
    print(f"{args.config}: ok ({len(config.sdei.events)} event(s), state in {config.state_dir})")
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
        )
    )
    print(shlex.join(argv))
    return 0


COMMANDS = {
    "run": _cmd_run,
    "status": _cmd_status,
    "check-config": _cmd_check_config,
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
    except SdeiError as err:
        print(f"qmp-sdei: {err}", file=sys.stderr)
        return ExitCode.STATE
    except KeyboardInterrupt:
        return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
