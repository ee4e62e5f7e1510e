"""The main job, end to end, as a person watches it (``bash scripts/quickstart.sh demo``).

1. builds the guest: the stock Debian arm64 kernel with its own defaults (KASLR, WFI idle) and an
   initramfs whose /init loads ``sdei_test.ko``, a module that registers SDEI event 1000 through
   Linux's own SDEI driver and prints a line from its handler;
2. starts a private mosquitto on loopback (or uses ``--mqtt URL``);
3. boots the guest under QEMU through the EL2 stub with the sidecar attached: pinned versions
   (SDEI 1.1, PSCI 1.0) and a fixed event set; the sidecar serves the VM's control API over MQTT;
4. raises events from an orchestrator client over MQTT and waits for the guest's handler lines;
5. live-migrates the VM to a second QEMU (its own sidecar), SDEI state inside QEMU's stream;
6. raises again on the destination, then checks the guest still has the versions it saw at boot.

Everything it starts is stopped at the end, also on Ctrl-C. Exit 0 only if every step passed.

    .venv/bin/python scripts/demo.py [--events N] [--smp N] [--mqtt URL] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the guest builders and the broker starter live with the tests

from qmp_sdei.boottest import qemu_spec  # noqa: E402
from qmp_sdei.config import parse  # noqa: E402
from qmp_sdei.control.mqtt import MqttControlClient  # noqa: E402
from qmp_sdei.daemon import Sidecar  # noqa: E402
from qmp_sdei.logs import configure_logging  # noqa: E402
from qmp_sdei.qemu.launch import QemuProcess  # noqa: E402
from support.guests import free_port  # noqa: E402
from support.linux_guest import (  # noqa: E402
    DELIVERY_LINE,
    EL2_APPEND,
    READY_LINE,
    LinuxEventGuest,
    prepare_linux_event_guest,
)
from support.mosquitto import running_mosquitto  # noqa: E402

TIMEOUT = 120.0
VM = "demo-vm"
SDEI_LINE = re.compile(r"sdei: SDEIv(?P<v>\d+\.\d+) \((?P<vendor>0x[0-9a-f]+)\) detected in firmware\.")
PSCI_LINE = re.compile(r"psci: PSCIv(?P<v>\d+\.\d+) detected in firmware\.")


class DemoFailed(Exception):
    pass


@dataclass
class Steps:
    """The step list a person watches: one line per step, with its time."""

    started: float = field(default_factory=time.perf_counter)
    results: list[tuple[str, float, bool]] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        live = sys.stdout.isatty()
        if live:
            print(f"  ..  {title}", end="", flush=True)
        t0 = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            took = time.perf_counter() - t0
            self.results.append((title, took, ok))
            print(f"{chr(13) if live else ''}  {'ok' if ok else 'FAIL'}  {title}  ({took:.1f} s)", flush=True)


@dataclass
class Numbers:
    versions_boot: tuple[str, str] = ("?", "?")
    versions_after: tuple[str, str] = ("?", "?")
    raised: int = 0
    delivered: int = 0
    entry_us: list[float] = field(default_factory=list)
    handler_line_ms: list[float] = field(default_factory=list)
    migration: dict[str, Any] = field(default_factory=dict)


def config_for(vm: QemuProcess, state_dir: Path, broker: str) -> dict[str, Any]:
    return {
        "vm": {"name": VM, "state_dir": str(state_dir)},
        "qmp": {"socket": str(vm.sidecar_socket), "mode": "connect", "timeout": TIMEOUT},
        "sdei": {"version": "1.1", "events": [{"number": 1000, "name": "demo"}]},
        "psci": {"version": "1.0"},
        "conduit": {"enabled": True, "start_vm": True},
        "mqtt": {"url": broker},
        "log": {"level": "warning", "format": "text"},
    }


@contextlib.asynccontextmanager
async def sidecar_running(config: dict[str, Any]) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(parse(config))
    task = asyncio.create_task(sidecar.run(), name=f"demo.sidecar.{config['vm']['state_dir']}")
    try:
        ready = asyncio.create_task(sidecar.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task in done or not done:
            raise DemoFailed(f"the sidecar did not come up: {sidecar.shutdown_reason or 'timeout'}")
        yield sidecar
    finally:
        sidecar.request_shutdown("demo over")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, TIMEOUT)


def versions(console: str, after: int = 0) -> tuple[str, str]:
    sdei = SDEI_LINE.search(console, after)
    psci = PSCI_LINE.search(console, after)
    return (sdei["v"] if sdei else "none", psci["v"] if psci else "none")


async def raise_events(
    client: MqttControlClient, vm: QemuProcess, *, count: int, smp: int, first: int, numbers: Numbers
) -> None:
    """Raise event 1000 ``count`` times over MQTT, each after the previous handler printed its line."""
    for i in range(count):
        n = first + i
        vcpu = i % smp
        t0 = time.perf_counter()
        reply = await client.request({"v": 1, "command": "raise", "event": 1000, "vcpu": vcpu, "wait": 10})
        numbers.raised += 1
        result = reply.get("result", {}) if reply.get("ok") else {}
        if result.get("result") == "delivered":
            numbers.entry_us.append(result["latency_us"])
        elif result.get("code") != "not_entered_yet":
            raise DemoFailed(f"raise #{n} on vCPU {vcpu}: {reply}")
        # A raise the vCPU did not take within the wait stays pending and is taken later: the
        # handler's line is the proof either way.
        await vm.wait_for_console(re.compile(DELIVERY_LINE.format(n=n)), TIMEOUT)
        numbers.delivered += 1
        numbers.handler_line_ms.append((time.perf_counter() - t0) * 1e3)


async def demo(args: argparse.Namespace, work: Path) -> Numbers:
    steps, numbers = Steps(), Numbers()
    with steps.step("build the guest (stock Debian arm64 kernel + sdei_test.ko initramfs; cached)"):
        guest: LinuxEventGuest = await asyncio.to_thread(prepare_linux_event_guest)
    async with contextlib.AsyncExitStack() as stack:
        broker = args.mqtt or stack.enter_context(running_mosquitto(work / "broker")).url
        print(f"        broker {broker}, the VM's topics under qmp-sdei/v1/{VM}/")

        async def boot_spec(side: str) -> Any:
            spec = await qemu_spec(
                work / side, guest.kernel.image, initrd=guest.initrd, cmdline=EL2_APPEND, smp=args.smp,
                cpu="cortex-a57", conduit="el2", psci_version=(1, 0),
            )  # fmt: skip
            spec.name = VM
            return spec

        src = await stack.enter_async_context(QemuProcess(await boot_spec("src"), work / "src" / "vm"))
        with steps.step(f"boot Linux (KASLR on, {args.smp} vCPUs) through the EL2 stub, sidecar attached"):
            source = await stack.enter_async_context(sidecar_running(config_for(src, work / "src-state", broker)))
            await src.wait_for_console(READY_LINE, TIMEOUT)
            numbers.versions_boot = versions(src.console)
        print(f"        the guest saw SDEI {numbers.versions_boot[0]} and PSCI {numbers.versions_boot[1]} at boot")
        client = await stack.enter_async_context(MqttControlClient(broker, VM, timeout=TIMEOUT))
        with steps.step(f"raise {args.events} events over MQTT; the guest's handler runs and prints"):
            await raise_events(client, src, count=args.events, smp=args.smp, first=1, numbers=numbers)

        port = free_port()
        dst_spec = await boot_spec("dst")
        dst_spec.extra_args = [*dst_spec.extra_args, "-incoming", f"tcp:127.0.0.1:{port}"]
        dst = await stack.enter_async_context(QemuProcess(dst_spec, work / "dst" / "vm"))
        destination = await stack.enter_async_context(sidecar_running(config_for(dst, work / "dst-state", broker)))
        assert destination.migration is not None
        await asyncio.wait_for(destination.migration.ready.wait(), TIMEOUT)
        with steps.step("live-migrate to a second QEMU, the SDEI state inside QEMU's stream"):
            reply = await client.request(
                {"v": 1, "command": "migrate", "uri": f"tcp:127.0.0.1:{port}"}, timeout=TIMEOUT
            )
            if not reply.get("ok") or reply["result"]["outcome"] != "completed":
                raise DemoFailed(f"migration: {reply}")
            numbers.migration = reply["result"]
            await asyncio.wait_for(destination.migration.arrived.wait(), TIMEOUT)
            await asyncio.wait_for(destination.conduit_ready.wait(), TIMEOUT)  # then the guest is served
            await asyncio.wait_for(destination.conduit.serving.wait(), TIMEOUT)
            await src.stop()  # the source QEMU quits, as its owner would after a migration
            source.request_shutdown("the VM migrated away")
        with steps.step(f"raise {args.events} events on the destination over MQTT"):
            async with MqttControlClient(broker, VM, timeout=TIMEOUT) as again:
                await raise_events(again, dst, count=args.events, smp=args.smp, first=args.events + 1, numbers=numbers)
        with steps.step("the guest still has the versions it saw at boot, and no oops"):
            pins = destination.status()["pins"]
            numbers.versions_after = (pins["sdei"], pins["psci"])
            if numbers.versions_after != numbers.versions_boot:
                raise DemoFailed(
                    f"pins {numbers.versions_after} differ from what the guest saw {numbers.versions_boot}"
                )
            if "Oops" in dst.console or "Kernel panic" in dst.console:
                raise DemoFailed("the guest oopsed on the destination")
    return numbers


def summary(numbers: Numbers) -> str:
    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2] if ordered else float("nan")

    mig = numbers.migration
    rows = [
        ("versions the guest saw at boot", f"SDEI {numbers.versions_boot[0]}, PSCI {numbers.versions_boot[1]}"),
        ("versions after the migration", f"SDEI {numbers.versions_after[0]}, PSCI {numbers.versions_after[1]}"),
        ("events raised / delivered", f"{numbers.raised} / {numbers.delivered}"),
        ("raise -> handler entered (median)", f"{median(numbers.entry_us) / 1e3:.2f} ms"),
        ("raise -> handler's console line (median)", f"{median(numbers.handler_line_ms):.1f} ms"),
        ("migration total / downtime", f"{mig.get('total_ms')} ms / {mig.get('downtime_ms')} ms"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5, help="events raised before and after the migration")
    parser.add_argument("--smp", type=int, default=2)
    parser.add_argument("--mqtt", help="use this broker (mqtt://HOST:PORT) instead of a private mosquitto")
    parser.add_argument("--workdir", type=Path, help="keep the VMs' files here (default: a temporary directory)")
    parser.add_argument(
        "--log-level", default="error", help="the sidecars' log level on stderr (debug shows every stop)"
    )
    args = parser.parse_args()
    configure_logging(args.log_level, "text")
    print("qmp-sdei demo: a stock Linux guest takes SDEI events over MQTT, before and after a live migration\n")
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qmp-sdei-demo-")))
            work.mkdir(parents=True, exist_ok=True)
            numbers = asyncio.run(demo(args, work))
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started has been stopped")
        return 130
    except (DemoFailed, Exception) as err:  # a person reads this: one line, then the exit code
        print(f"\ndemo FAILED: {type(err).__name__}: {err}")
        return 1
    print(f"\nsummary ({time.perf_counter() - started:.0f} s in all)\n{summary(numbers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
