"""``qmp-sdei`` command line.

Subcommands::

    qmp-sdei run --config vm1.toml [--log-format json] [--log-level debug]
    qmp-sdei status (--config vm1.toml | --state-dir DIR) [--json]
    qmp-sdei check-config vm1.toml
    qmp-sdei boot-test --kernel IMAGE [--expect-sdei 1.1 --expect-psci 1.0] [--smp N]
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
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qmp_sdei import __version__
from qmp_sdei.config import Config, load
from qmp_sdei.daemon import Sidecar
from qmp_sdei.errors import ConfigError, ExitCode, IncompatibleState, SdeiError
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

    sub.add_parser("version", help="print the version")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    config = load(args.config)
    configure_logging(args.log_level or config.log.level, args.log_format or config.log.format)
    sidecar = Sidecar(config)

    def early_shutdown(signum: int, _frame: object) -> None:
        sidecar.request_shutdown(signal.Signals(signum).name)

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
    if not config.conduit.enabled:
        return []
    from qmp_sdei.conduit.service import find_trap_sites  # noqa: PLC0415 (optional subsystem)

    return await find_trap_sites(config.conduit)


def _cmd_status(args: argparse.Namespace) -> int:
    state_dir = load(args.config).state_dir if args.config else args.state_dir
    store = StateStore(state_dir)
    doc = store.read_status()
    doc["alive"] = store.writer_alive()
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return ExitCode.OK
    reader = _StatusReader(doc)
    print(_status_text(reader))
    if reader.problems:
        # Show what could be read, then say which part of the file made no sense.
        raise IncompatibleState(f"{store.status_path}: unexpected content: {'; '.join(reader.problems[:3])}")
    return ExitCode.OK


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
    traps = f", {len(sites)} trap site(s)" if config.conduit.enabled else ""
    print(f"{args.config}: ok ({len(config.sdei.events)} event(s){traps}, state in {config.state_dir})")
    return ExitCode.OK


def _cmd_boot_test(args: argparse.Namespace) -> int:
    from qmp_sdei.boottest import run_boot_test  # noqa: PLC0415 (pulls in the Linux tooling)

    configure_logging("warning", "text")
    report = asyncio.run(
        run_boot_test(
            args.kernel, expect_sdei=args.expect_sdei, expect_psci=args.expect_psci, smp=args.smp, timeout=args.timeout
        )
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.passed else 1


#: characters that would break an error message over lines (what str.splitlines() splits on)
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def _one_line(text: str) -> str:
    """An error message on one line, whatever a path or value in it contains."""
    return "".join(repr(c)[1:-1] if c in _LINE_BREAKS else c for c in text)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "status": _cmd_status,
    "check-config": _cmd_check_config,
    "boot-test": _cmd_boot_test,
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
