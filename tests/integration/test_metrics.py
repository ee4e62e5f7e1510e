"""The Prometheus exporter, scraped over real HTTP while a real owner and dispatcher do SDEI work."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from qmp_sdei.conduit.gdbstub import ConduitStats
from qmp_sdei.errors import ConfigError
from qmp_sdei.metrics import MetricsExporter, SidecarMetrics, serve_metrics
from qmp_sdei.metrics_settings import MetricsSettings
from qmp_sdei.owner import NotificationKind, RaiseResult, SdeiOwner
from qmp_sdei.sdei import Completion, VcpuRegs
from qmp_sdei.versions import VersionPins
from support.sdei import ARG, ENTRY, PRIVATE, F, interrupted_regs, make

pytestmark = pytest.mark.asyncio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 (http to our own loopback server)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def scrape(url: str) -> Samples:
    status, headers, body = await asyncio.to_thread(_get, url)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@dataclass
class Running:
    owner: SdeiOwner
    metrics: SidecarMetrics
    url: str


class WiredOwner(SdeiOwner):
    """The owner with the one line the daemon adds: each SDEI call is counted by function and result."""

    observe: Callable[[int, int, Completion], None] | None = None

    def hypercall(self, vcpu: int, regs: VcpuRegs) -> Completion:
        fid = regs.x[0]
        outcome = super().hypercall(vcpu, regs)
        if self.observe is not None:
            self.observe(fid, regs.x[0], outcome)
        return outcome


@pytest_asyncio.fixture
async def running() -> AsyncIterator[Running]:
    owner = WiredOwner(make(), pins=VersionPins((1, 1), 0, (1, 0)))
    metrics = SidecarMetrics("vm-metrics-test", version="0.1.0")
    owner.observe = metrics.observe_sdei_call
    metrics.watch_owner(owner)
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_metrics(metrics, MetricsSettings("127.0.0.1", 0), owner, listening=listening.set_result),
        name="metrics",
    )
    host, port = await asyncio.wait_for(listening, 10)
    try:
        yield Running(owner, metrics, f"http://{host}:{port}/metrics")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def guest_call(owner: SdeiOwner, vcpu: int, fid: int, *args: int, regs: VcpuRegs | None = None) -> None:
    regs = regs or VcpuRegs(pc=0x4008_0808)
    regs.x[0] = fid
    for i, arg in enumerate(args, start=1):
        regs.x[i] = arg
    owner.begin_stop()
    owner.hypercall(vcpu, regs)
    owner.commit()
    owner.end_stop()


async def settled(metrics: SidecarMetrics, owner: SdeiOwner) -> None:
    """Wait until the metrics' subscription has read everything the owner published."""

    async def drained() -> None:
        while True:
            subs = list(owner._subscribers)
            if subs and all(not s._items for s in subs):
                return
            await asyncio.sleep(0)

    await asyncio.wait_for(drained(), 10)


async def test_sdei_work_shows_up_in_a_scrape(running: Running) -> None:
    owner, metrics = running.owner, running.metrics
    # vCPU 0 registers, enables and unmasks event 1000; vCPU 1 registers it but stays masked.
    for vcpu in (0, 1):
        guest_call(owner, vcpu, F.EVENT_REGISTER, PRIVATE, ENTRY, ARG, 0, 0)
        guest_call(owner, vcpu, F.EVENT_ENABLE, PRIVATE)
    guest_call(owner, 0, F.PE_UNMASK)
    guest_call(owner, 0, F.EVENT_ENABLE, 4242)  # not in the catalogue: INVALID_PARAMETERS

    # A host raise on vCPU 0, entered by a conduit stop; vCPU 1 is masked, so its raise waits.
    def conduit_stop() -> None:
        owner.begin_stop()
        for vcpu in owner.deliverable():
            owner.deliver(vcpu, interrupted_regs(vcpu))
        owner.commit()
        owner.end_stop()

    owner.bind_delivery(lambda: asyncio.get_running_loop().call_soon(conduit_stop))
    delivered = await owner.raise_event(PRIVATE, 0, wait=10)
    assert delivered.result is RaiseResult.DELIVERED
    pending = await owner.raise_event(PRIVATE, 1, wait=10)
    assert pending.result is RaiseResult.PENDING
    refused = await owner.raise_event(999, 0)
    assert refused.result is RaiseResult.REFUSED
    guest_call(owner, 0, F.EVENT_COMPLETE, 0)  # the handler on vCPU 0 completes
    await settled(metrics, owner)

    samples = await scrape(running.url)
    assert value(samples, "qmp_sdei_sidecar_info", vm="vm-metrics-test", version="0.1.0") == 1
    assert value(samples, "qmp_sdei_calls_total", function="event_register", result="success") == 2
    assert value(samples, "qmp_sdei_calls_total", function="event_enable", result="success") == 2
    assert value(samples, "qmp_sdei_calls_total", function="event_enable", result="invalid_parameters") == 1
    assert value(samples, "qmp_sdei_calls_total", function="event_complete", result="completed") == 1
    assert value(samples, "qmp_sdei_events_raised_total", event="1000", source="host") == 2
    assert value(samples, "qmp_sdei_events_pended_total", event="1000") == 1
    assert value(samples, "qmp_sdei_events_delivered_total", event="1000") == 1
    assert value(samples, "qmp_sdei_events_completed_total", event="1000", how="complete") == 1
    assert value(samples, "qmp_sdei_handler_seconds_count") == 1
    assert value(samples, "qmp_sdei_events_pending") == 1  # vCPU 1's, still masked
    assert value(samples, "qmp_sdei_handlers_running") == 0
    assert value(samples, "qmp_sdei_owner_refused_total") == 1
    assert value(samples, "qmp_sdei_owner_delivered_total") == 1
    assert value(samples, "qmp_sdei_notifications_lost") == 0
    assert not any(name == "qmp_sdei_mqtt_connected" for name, _ in samples)  # no broker configured

    # Pushed values: broker state, migrations, a VM reset; the next scrape sees them.
    metrics.set_broker_connected(True)
    metrics.migration_outcome("failed")
    # The migration agent's notifications: phases as QEMU reports them; only final ones count.
    for phase, incoming in (("setup", False), ("active", False), ("completed", False), ("completed", True)):
        owner.notify(NotificationKind.SIDECAR, what="migration", phase=phase, incoming=incoming)
    await owner.vm_reset(guest=False, reason="host-qmp-system-reset")
    await settled(metrics, owner)
    samples = await scrape(running.url)
    assert value(samples, "qmp_sdei_mqtt_connected") == 1
    assert value(samples, "qmp_sdei_migrations_total", outcome="completed", direction="outgoing") == 1
    assert value(samples, "qmp_sdei_migrations_total", outcome="completed", direction="incoming") == 1
    assert value(samples, "qmp_sdei_migrations_total", outcome="failed", direction="outgoing") == 1
    assert not any(labels == (("direction", "outgoing"), ("outcome", "active")) for _, labels in samples)
    assert value(samples, "qmp_sdei_resets_total", scope="vm", cause="host-qmp-system-reset") == 1
    assert value(samples, "qmp_sdei_events_pending") == 0  # a reset drops pending events
    metrics.set_broker_connected(False)
    assert value(await scrape(running.url), "qmp_sdei_mqtt_connected") == 0


async def test_the_conduit_latency_samples_feed_the_histograms(running: Running) -> None:
    stats = ConduitStats()
    stats.trap_handling_ns.append(7)  # taken before the tap: kept, not observed
    running.metrics.tap_conduit(stats)
    for ns in (30_000, 400_000, 2_000_000):
        stats.trap_handling_ns.append(ns)
    stats.delivery_ns.append(1_500_000)
    stats.stops = 5
    assert list(stats.trap_handling_ns) == [7, 30_000, 400_000, 2_000_000]  # the conduit's own view is intact
    samples = await scrape(running.url)
    assert value(samples, "qmp_sdei_trapped_call_seconds_count") == 3
    assert value(samples, "qmp_sdei_trapped_call_seconds_bucket", le="5e-05") == 1
    assert value(samples, "qmp_sdei_trapped_call_seconds_bucket", le="0.0005") == 2
    assert value(samples, "qmp_sdei_trapped_call_seconds_sum") == pytest.approx(0.00243)
    assert value(samples, "qmp_sdei_delivery_seconds_count") == 1
    assert value(samples, "qmp_sdei_conduit_stops_total") == 5


async def test_the_broker_state_is_pulled_from_the_bridge(running: Running) -> None:
    @dataclass
    class BridgeStats:  # the shape of qmp_sdei.control.mqtt.MqttStats
        connects: int = 0
        disconnects: int = 0

    stats, up = BridgeStats(), [False]
    running.metrics.watch_broker(lambda: up[0], lambda: stats)
    samples = await scrape(running.url)
    assert value(samples, "qmp_sdei_mqtt_connected") == 0
    up[0], stats.connects = True, 1
    samples = await scrape(running.url)
    assert value(samples, "qmp_sdei_mqtt_connected") == 1
    assert value(samples, "qmp_sdei_mqtt_connects_total") == 1
    assert value(samples, "qmp_sdei_mqtt_disconnects_total") == 0


async def test_psci_calls_are_labelled() -> None:
    metrics = SidecarMetrics("vm")
    metrics.observe_psci_call(0x8400_0000, 0x1_0000)  # PSCI_VERSION answered by the filter
    metrics.observe_psci_call(0xC400_0003, None)  # CPU_ON passed through to QEMU
    metrics.observe_psci_call(0x8400_0013, 0xFFFF_FFFF_FFFF_FFFF)  # a call the pinned version lacks
    metrics.observe_sdei_call(0xC400_00FF, 0xFFFF_FFFF_FFFF_FFFF)  # outside the SDEI table
    text = metrics.render().decode()
    assert 'qmp_sdei_calls_total{function="psci_version",result="answered"} 1.0' in text
    assert 'qmp_sdei_calls_total{function="psci_cpu_on_64",result="passthrough"} 1.0' in text
    assert 'qmp_sdei_calls_total{function="psci_mem_protect",result="not_supported"} 1.0' in text
    assert 'qmp_sdei_calls_total{function="sdei_0xc40000ff",result="not_supported"} 1.0' in text


async def test_a_broken_source_is_skipped_not_fatal(running: Running) -> None:
    def broken() -> object:
        raise RuntimeError("gone")

    running.metrics.add_counters("broken", broken)
    running.metrics.add_counters("odd", lambda: 42)
    samples = await scrape(running.url)
    assert value(samples, "qmp_sdei_events_pending") == 0
    assert not any(name.startswith(("qmp_sdei_broken", "qmp_sdei_odd")) for name, _ in samples)


async def test_http_edges(running: Running) -> None:
    base = running.url.removesuffix("/metrics")
    status, headers, body = await asyncio.to_thread(_get, running.url, "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    status, _, _ = await asyncio.to_thread(_get, base + "/metrics?name[]=x")
    assert status == 200
    status, _, body = await asyncio.to_thread(_get, base + "/")
    assert (status, body) == (404, b"metrics are at /metrics\n")
    status, headers, _ = await asyncio.to_thread(_get, running.url, "POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"

    host, port = base.removeprefix("http://").split(":")

    async def raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(data)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return reply

    assert (await raw(b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await raw(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")).startswith(b"HTTP/1.1 431 ")
    # A client that connects and leaves without a request costs nothing and breaks nothing.
    _, writer = await asyncio.open_connection(host, int(port))
    writer.close()
    assert (await scrape(running.url))[("qmp_sdei_events_pending", ())] == 0


async def test_an_address_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exporter = MetricsExporter(lambda: b"", "127.0.0.1", port)
        with pytest.raises(ConfigError, match=rf"^metrics\.listen: cannot listen on 127\.0\.0\.1:{port}: "):
            await exporter.start()
