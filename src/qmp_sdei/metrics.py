"""Prometheus metrics for one sidecar, and the HTTP exporter that serves them (``[metrics]``).

Off unless ``[metrics]`` is configured (:mod:`qmp_sdei.metrics_settings`), and on loopback unless
``allow_remote`` says otherwise. Each sidecar has its own registry (never prometheus-client's global
one), so tests and several sidecars in one process do not share numbers.

Fed three ways:

* **Notifications** of the :class:`~qmp_sdei.owner.SdeiOwner` (:meth:`SidecarMetrics.follow`):
  events raised (by the host, or signalled by the guest), handlers entered, completed (with the
  handler's time from entry to COMPLETE), resets, restores.
* **Pulled at scrape time** (:meth:`SidecarMetrics.watch_owner`, :meth:`SidecarMetrics.add_counters`):
  events pending and handlers running now, and every integer counter the sidecar already keeps
  (owner, conduit, control, MQTT), under ``qmp_sdei_<source>_<field>_total``. Nothing is copied
  between scrapes, so nothing can drift.
* **Pushed by the code that knows** (each a cheap, synchronous call): :meth:`~SidecarMetrics.observe_call`
  per trapped SDEI/PSCI call, :meth:`~SidecarMetrics.observe_trap` and
  :meth:`~SidecarMetrics.observe_delivery` for the conduit's latencies (or
  :meth:`~SidecarMetrics.tap_conduit`, which observes the samples the conduit already records),
  :meth:`~SidecarMetrics.set_broker_connected`, :meth:`~SidecarMetrics.migration_outcome`.

The exporter (:class:`MetricsExporter`) is a small asyncio HTTP/1.1 server answering ``GET /metrics``
in the text exposition format; it runs as one task of the sidecar and renders in the event loop, so
the pulled values are read between two owner actions, never in the middle of one.

What it must not do: change anything it observes, or make the guest wait. A failing source is
logged and skipped at scrape time; the HTTP server bounds request size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qmp_sdei.abi import psci
from qmp_sdei.abi.sdei import Function as SdeiFunction
from qmp_sdei.abi.sdei import Result as SdeiResult
from qmp_sdei.abi.smccc import function_id, to_s64
from qmp_sdei.errors import ConfigError
from qmp_sdei.metrics_settings import MetricsSettings
from qmp_sdei.owner import Notification, NotificationKind
from qmp_sdei.sdei import Completion

if TYPE_CHECKING:
    from qmp_sdei.owner import SdeiOwner

log = logging.getLogger("qmp_sdei.metrics")

PREFIX = "qmp_sdei"

#: Seconds. A trapped call costs the sidecar tens of microseconds to milliseconds over the gdbstub.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
#: Seconds from handler entry to COMPLETE: up to what a watchdog handler might take.
HANDLER_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0, 10.0)

#: Labelled call counters remembered for the fast path (function ids x results are few; this only
#: bounds what a guest calling random function ids could make us keep).
MAX_CACHED_CHILDREN = 1024

#: QEMU's migration statuses that end a migration (``sidecar`` notifications carry them as ``phase``).
MIGRATION_FINAL_PHASES = frozenset({"completed", "failed", "cancelled"})

#: Request line plus headers a scraper may send; more is refused (431).
MAX_REQUEST_HEAD = 16 * 1024
#: Seconds a client gets to send its request.
REQUEST_TIMEOUT = 10.0


def sdei_function_name(fid: int) -> str:
    try:
        return SdeiFunction(fid).name.lower()
    except ValueError:
        return f"sdei_0x{fid:08x}"


def psci_function_name(fid: int) -> str:
    try:
        return "psci_" + psci.Function(fid).name.lower().removeprefix("psci_")
    except ValueError:
        return f"psci_0x{fid:08x}"


def sdei_result_name(x0: int, completion: Completion = Completion.RETURN) -> str:
    """How an SDEI call ended, as a label: ``success``, an error name, or ``completed``."""
    if completion is Completion.COMPLETE:
        return "completed"
    if completion is Completion.COMPLETE_AND_RESUME:
        return "completed_and_resumed"
    value = to_s64(x0)
    if value >= 0:
        return "success"  # VERSION, EVENT_STATUS, INTERRUPT_BIND... return data, not a status
    try:
        return SdeiResult(value).name.lower()
    except ValueError:
        return f"error_{value}"


class _PullCollector(Collector):
    """Values read at scrape time from callables the sidecar supplies."""

    def __init__(self) -> None:
        self.counter_sources: dict[str, Callable[[], object]] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def collect(self) -> Iterable[Metric]:
        for source, read in list(self.counter_sources.items()):
            try:
                counts = list(_integer_fields(read()))
            except Exception as err:  # a broken source must not break the scrape
                log.warning("metrics: cannot read %s counters: %s", source, err)
                continue
            for field, count in counts:
                yield CounterMetricFamily(f"{PREFIX}_{source}_{field}", f"{source} counter {field}", value=count)
        for name, (doc, read_gauge) in list(self.gauges.items()):
            try:
                value = float(read_gauge())
            except Exception as err:
                log.warning("metrics: cannot read %s: %s", name, err)
                continue
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _integer_fields(obj: object) -> Iterator[tuple[str, int]]:
    """The integer fields of a dataclass or mapping (latency sample deques and the like are skipped)."""
    items: Iterable[tuple[str, Any]]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    elif isinstance(obj, Mapping):
        items = obj.items()
    else:
        raise TypeError(f"expected a dataclass or a mapping, got {type(obj).__name__}")
    for name, value in items:
        if isinstance(value, int) and not isinstance(value, bool):
            yield str(name), value


class _ObservingSamples(deque[int]):
    """A drop-in for the conduit's latency sample deques that also feeds a histogram (ns -> s)."""

    def __init__(self, samples: deque[int], observe: Callable[[float], None]) -> None:
        super().__init__(samples, maxlen=samples.maxlen)
        self._observe = observe

    def append(self, value: int) -> None:
        super().append(value)
        self._observe(value / 1e9)


class SidecarMetrics:
    """The metrics of one sidecar, in a registry of their own (:attr:`registry`)."""

    def __init__(self, vm: str, *, version: str = "") -> None:
        self.vm = vm
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Info(f"{PREFIX}_sidecar", "the sidecar and the VM it serves", registry=r)
        self.info.info({"vm": vm, "version": version})
        self.calls = Counter(
            f"{PREFIX}_calls",
            "guest SDEI/PSCI calls trapped, by function and result",
            ["function", "result"],
            registry=r,
        )
        self.raised = Counter(
            f"{PREFIX}_events_raised",
            "events raised: by the host (control API) or signalled by the guest",
            ["event", "source"],
            registry=r,
        )
        self.delivered = Counter(f"{PREFIX}_events_delivered", "handlers entered, by event", ["event"], registry=r)
        self.pended = Counter(
            f"{PREFIX}_events_pended", "host raises that had to wait (disabled, masked, busy)", ["event"], registry=r
        )
        self.completed = Counter(
            f"{PREFIX}_events_completed", "handlers completed, by event and how", ["event", "how"], registry=r
        )
        self.handler_seconds = Histogram(
            f"{PREFIX}_handler_seconds", "handler entry to COMPLETE", buckets=HANDLER_BUCKETS, registry=r
        )
        self.trap_seconds = Histogram(
            f"{PREFIX}_trapped_call_seconds",
            "a trapped call's time in the sidecar: stop received to vCPU resumed, or post taken to answer written",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            f"{PREFIX}_delivery_seconds",
            "delivery asked for to handler registers written and the vCPU resumed",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resets = Counter(
            f"{PREFIX}_resets", "SDEI state resets, by scope and cause", ["scope", "cause"], registry=r
        )
        self.restores = Counter(f"{PREFIX}_restores", "whole-state restores, by cause", ["cause"], registry=r)
        self.migrations = Counter(
            f"{PREFIX}_migrations",
            "migrations ended, by QEMU's final status on this side and direction",
            ["outcome", "direction"],
            registry=r,
        )
        self._broker_connected: float | None = None  # None: no broker configured, no series
        self._sdei_children: dict[tuple[int, int, Completion], Any] = {}
        self._pull = _PullCollector()
        r.register(self._pull)
        self._subscription_lost: Callable[[], int] = lambda: 0

    # ---- pushed ---------------------------------------------------------------------------------------

    def observe_call(self, function: str, result: str) -> None:
        self.calls.labels(function=function, result=result).inc()

    def observe_sdei_call(self, fid: int, x0: int, completion: Completion = Completion.RETURN) -> None:
        """An SDEI call the dispatcher answered: ``x0`` as it left the dispatcher.

        Runs inside the conduit's stop, so it is on every call's guest-visible path: the labelled
        child is looked up once per (function id, result) and cached (bench/metrics.py).
        """
        key = (fid, x0 if completion is Completion.RETURN and x0 >> 63 else 0, completion)
        child = self._sdei_children.get(key)
        if child is None:
            name = sdei_function_name(function_id(fid))
            child = self.calls.labels(function=name, result=sdei_result_name(x0, completion))
            if len(self._sdei_children) < MAX_CACHED_CHILDREN:
                self._sdei_children[key] = child
        child.inc()

    def observe_psci_call(self, fid: int, answer: int | None) -> None:
        """A PSCI call: answered by the sidecar's version filter, or passed through to QEMU (None)."""
        if answer is None:
            result = "passthrough"
        elif to_s64(answer) == psci.NOT_SUPPORTED:
            result = "not_supported"
        else:
            result = "answered"
        self.observe_call(psci_function_name(function_id(fid)), result)

    def observe_trap(self, seconds: float) -> None:
        self.trap_seconds.observe(seconds)

    def observe_delivery(self, seconds: float) -> None:
        self.delivery_seconds.observe(seconds)

    def set_broker_connected(self, connected: bool) -> None:
        """The MQTT broker connection went up or down; the series exists from the first call on."""
        self._broker_connected = 1.0 if connected else 0.0
        self.watch_broker(lambda: self._broker_connected == 1.0)

    def watch_broker(self, connected: Callable[[], bool], stats: Callable[[], object] | None = None) -> None:
        """Read the MQTT bridge's connection state (and its counters) at each scrape."""
        self.add_gauge(
            "mqtt_connected", "1 while the MQTT broker connection is up", lambda: 1.0 if connected() else 0.0
        )
        if stats is not None:
            self.add_counters("mqtt", stats)

    def migration_outcome(self, outcome: str, direction: str = "outgoing") -> None:
        """One migration ended (``completed``, ``failed``, ``cancelled``), ``outgoing`` or ``incoming``.

        The migration agent's ``sidecar`` notifications already feed this through :meth:`follow`;
        call it directly only for migrations no notification reports.
        """
        self.migrations.labels(outcome=outcome, direction=direction).inc()

    def observe_notification(self, note: Notification) -> None:
        """Count one owner notification (what :meth:`follow` does for each)."""
        kind, event = note.kind, "" if note.event is None else str(note.event)
        if kind is NotificationKind.RAISED:
            self.raised.labels(event=event, source="host").inc()
        elif kind is NotificationKind.SIGNALLED:
            self.raised.labels(event=event, source="guest").inc()
        elif kind is NotificationKind.PENDING:
            self.pended.labels(event=event).inc()
        elif kind is NotificationKind.ENTERED:
            self.delivered.labels(event=event).inc()
        elif kind in (NotificationKind.COMPLETED, NotificationKind.COMPLETED_AND_RESUMED):
            how = "resumed" if kind is NotificationKind.COMPLETED_AND_RESUMED else "complete"
            self.completed.labels(event=event, how=how).inc()
            handler_us = note.detail.get("handler_us")
            if isinstance(handler_us, int | float):
                self.handler_seconds.observe(handler_us / 1e6)
        elif kind is NotificationKind.RESET:
            scope = str(note.detail.get("scope", ""))
            self.resets.labels(scope=scope, cause=str(note.detail.get("cause", ""))).inc()
        elif kind is NotificationKind.RESTORED:
            self.restores.labels(cause=str(note.detail.get("cause", ""))).inc()
        elif kind is NotificationKind.SIDECAR and note.detail.get("what") == "migration":
            phase = note.detail.get("phase")
            if phase in MIGRATION_FINAL_PHASES:
                self.migration_outcome(str(phase), "incoming" if note.detail.get("incoming") else "outgoing")

    # ---- pulled -----------------------------------------------------------------------------------------

    def add_counters(self, source: str, read: Callable[[], object]) -> None:
        """Export the integer fields of ``read()`` (a dataclass or mapping) as ``qmp_sdei_<source>_<field>_total``."""
        self._pull.counter_sources[source] = read

    def add_gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self._pull.gauges[name] = (doc, read)

    def watch_owner(self, owner: SdeiOwner) -> None:
        """Pull the owner's counters and the state of its events at each scrape."""
        dispatcher = owner.dispatcher
        self.add_counters("owner", lambda: owner.counters)
        self.add_gauge("events_pending", "raised events waiting to be delivered", lambda: len(dispatcher.pending))
        self.add_gauge(
            "handlers_running",
            "handlers entered and not yet completed",
            lambda: sum(len(v.stack) for v in dispatcher.vcpus),
        )
        self.add_gauge(
            "notifications_lost",
            "owner notifications the metrics fell too far behind to count",
            lambda: self._subscription_lost(),  # noqa: PLW0108 (follow() replaces it later)
        )

    def tap_conduit(self, stats: Any) -> None:
        """Observe the conduit's own latency samples (``trap_handling_ns``, ``delivery_ns``, and the
        EL2 conduit's ``mailbox_ns``, also calls served) as they are taken.

        Replaces the two sample deques of a :class:`~qmp_sdei.conduit.gdbstub.ConduitStats` with ones
        that keep the same samples and also feed :attr:`trap_seconds` and :attr:`delivery_seconds`.
        """
        stats.trap_handling_ns = _ObservingSamples(stats.trap_handling_ns, self.observe_trap)
        stats.delivery_ns = _ObservingSamples(stats.delivery_ns, self.observe_delivery)
        if hasattr(stats, "mailbox_ns"):  # the EL2 stub's calls answered without a stop
            stats.mailbox_ns = _ObservingSamples(stats.mailbox_ns, self.observe_trap)
        self.add_counters("conduit", lambda: stats)

    async def follow(self, owner: SdeiOwner) -> None:
        """Count the owner's notifications until cancelled."""
        with owner.subscribe() as notes:
            self._subscription_lost = lambda: notes.lost
            async for note in notes:
                self.observe_notification(note)

    def render(self) -> bytes:
        """The exposition text, as a scrape gets it."""
        return generate_latest(self.registry)


class MetricsExporter:
    """``GET /metrics`` over HTTP/1.1 on one address, as an asyncio server (no threads)."""

    def __init__(self, render: Callable[[], bytes], host: str, port: int) -> None:
        self._render = render
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self.scrapes = 0

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when it was asked for port 0)."""
        if self._server is None or not self._server.sockets:
            return self.host, self.port
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def start(self) -> None:
        """Bind and listen. :raise ConfigError: the address is taken or cannot be used (names the key)."""
        try:
            self._server = await asyncio.start_server(self._serve_client, self.host, self.port, limit=MAX_REQUEST_HEAD)
        except OSError as err:
            raise ConfigError(
                f"metrics.listen: cannot listen on {self.host}:{self.port}: {err.strerror or err}"
            ) from err
        host, port = self.address
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), REQUEST_TIMEOUT)
            self._server = None

    async def serve(self) -> None:
        """Start (unless started) and serve until cancelled; then stop listening."""
        if self._server is None:
            await self.start()
        try:
            await asyncio.Event().wait()  # the server runs on its own; this task only holds it open
        finally:
            await self.close()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, content_type, head_only = await self._answer(reader)
            headers = [
                f"HTTP/1.1 {status}",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}",
                "Connection: close",
            ]
            if status.startswith("405"):
                headers.append("Allow: GET, HEAD")
            writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head_only else body))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the scraper went away or stalled; it will try again
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str, bool]:
        plain = "text/plain; charset=utf-8"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            return "431 Request Header Fields Too Large", b"request head too large\n", plain, False
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", b"bad request line\n", plain, False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET and HEAD\n", plain, False
        path = target.split("?", 1)[0]
        if path != "/metrics":
            return "404 Not Found", b"metrics are at /metrics\n", plain, method == "HEAD"
        self.scrapes += 1
        try:
            body = self._render()
        except Exception:  # a bug in a collector: say so to the scraper, keep serving
            log.exception("metrics: rendering failed")
            return "500 Internal Server Error", b"rendering failed; see the sidecar's log\n", plain, False
        return "200 OK", body, CONTENT_TYPE_LATEST, method == "HEAD"


async def serve_metrics(
    metrics: SidecarMetrics,
    settings: MetricsSettings,
    owner: SdeiOwner | None = None,
    *,
    listening: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """The sidecar's metrics task: listen on ``settings`` and count ``owner``'s notifications until cancelled.

    :raise ConfigError: the address cannot be listened on (the sidecar then stops: a configured
        exporter that silently is not there would look like a healthy, idle VM).
    """
    exporter = MetricsExporter(metrics.render, settings.host, settings.port)
    await exporter.start()
    if listening is not None:
        listening(exporter.address)
    try:
        if owner is None:
            await exporter.serve()
        else:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(exporter.serve(), name="metrics.http")
                tg.create_task(metrics.follow(owner), name="metrics.follow")
    finally:
        await exporter.close()
