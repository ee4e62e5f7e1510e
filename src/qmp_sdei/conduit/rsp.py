"""An asyncio client for the GDB remote serial protocol, shaped around QEMU's gdbstub (7.2 and 10).

The sidecar reaches the guest through QEMU's gdbstub because QEMU answers every ``hvc`` itself;
breakpoints on the guest's ``hvc #0`` are the only way to see its calls. This module is the wire
layer only: framing, checksums, escaping, run-length decoding, reply routing, and typed helpers
for the handful of packets the conduit needs. It knows nothing about SDEI.

Facts this client is built around (``docs/conduit.md`` has them; ``docs/qemu-versions.md`` lists what
differs between releases):

* There is no ``QStartNoAckMode``. QEMU acks each of our packets with ``+`` but never waits for
  our acks, and *any* byte reaching it while the VM runs stops the VM. So this client never sends
  ``+``/``-``; it ignores QEMU's acks. That is also what makes pipelining (``G`` and ``vCont;c``
  in one write) safe.
* A raw ``0x03`` byte stops a running VM (reply ``T02``). QEMU discards it when the VM is already
  stopped (a breakpoint stop on its way, or someone else paused it), so an interrupt racing a
  breakpoint gives at most one stop reply. QEMU also ignores it while it keeps its last packet
  for a resend, i.e. until our next ``$`` or ``+``: so an interrupt that follows a reply
  (rather than a resume packet) is sent as ``+`` then ``0x03``.
* Which stops are reported differs: QEMU 7.2 sends a stop reply whenever the VM stops. From 8.1 on
  a stop reply only answers a resume of ours (``c``/``s``/``vCont``) or our ``0x03``: after the
  VM's owner resumes it over QMP, its next breakpoint stop is silent (:attr:`stops_received` lets
  the conduit tell whether a stop reply came).
* Connecting stops a running VM. QEMU 7.2 then pushes an unsolicited ``T02`` before any request;
  8.1 and later send nothing.
* Thread ids are multiprocess style (``p01.02``); detach must be ``D;1``.

Replies are routed by their first byte: stop replies (``T``, ``S``, ``W``, ``X``) go to a stop
queue, everything else resolves the oldest outstanding request, in order. No command we send has a
reply that starts with those letters, so the split is unambiguous.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from qmp_sdei.errors import ConduitError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for any single reply. Generous: TCG on a busy 2-core host can stall."""

INTERRUPT = b"\x03"
_ESCAPE = 0x7D  # '}'
_NEEDS_ESCAPE = re.compile(rb"[$#}*]")
_STOP_KINDS = frozenset(b"TSWX")

CORE_FORMAT = struct.Struct("<33QI")
"""The ``g``/``G`` block of QEMU's aarch64 core feature: x0..x30, sp, pc (u64) and cpsr (u32)."""

SIGNAL_INT = 0x02  # SIGINT: our 0x03, or QEMU's own pause (attach, QMP stop)
SIGNAL_QUIT = 0x03  # QEMU's RUN_STATE_SHUTDOWN stop: the guest powered off (QEMU exits next)
SIGNAL_TRAP = 0x05  # breakpoint or single-step completion
SIGNAL_XCPU = 0x18  # QEMU's migration stop (RUN_STATE_FINISH_MIGRATE)


# --------------------------------------------------------------------------------------------
# Pure codec: framing, checksums, escaping, run-length decoding
# --------------------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The RSP checksum: the sum of the bytes between ``$`` and ``#``, modulo 256."""
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape the bytes the framing reserves (``$ # } *``) as ``}`` followed by byte XOR 0x20."""
    # A regex scans in C: a register block is 536 hex digits and is sent on every trapped call.
    return _NEEDS_ESCAPE.sub(lambda m: bytes((_ESCAPE, m.group()[0] ^ 0x20)), data)


def decode_body(data: bytes) -> bytes:
    """Undo escaping and run-length encoding of a received packet body.

    ``X*n`` repeats the previous *decoded* byte ``ord(n) - 29`` more times; ``}c`` stands for
    ``c ^ 0x20``. Both are processed in one pass, as GDB does, because a run may repeat an
    escaped byte.
    """
    if _ESCAPE not in data and 0x2A not in data:
        return data
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b == _ESCAPE:
            if i + 1 >= n:
                raise ConduitError("malformed RSP packet: escape character at the end of the body")
            out.append(data[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A:  # '*'
            if not out or i + 1 >= n:
                raise ConduitError("malformed RSP packet: run-length marker without a byte to repeat")
            count = data[i + 1] - 29
            if count < 0:
                raise ConduitError(f"malformed RSP packet: bad run-length count {data[i + 1]:#x}")
            out += bytes((out[-1],)) * count
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def frame(payload: bytes | str) -> bytes:
    """Wrap a payload as ``$<escaped payload>#<checksum>`` ready to send."""
    raw = payload.encode("ascii") if isinstance(payload, str) else payload
    body = escape(raw)
    return b"$" + body + b"#" + f"{checksum(body):02x}".encode("ascii")


@dataclass(frozen=True)
class Ack:
    """A ``+`` (ok) or ``-`` (resend) from the peer."""

    ok: bool


@dataclass(frozen=True)
class Packet:
    """One received packet with its body decoded."""

    payload: bytes


class PacketDecoder:
    """Incremental decoder: feed it bytes as they arrive, iterate the acks and packets found.

    It keeps partial packets between calls, verifies checksums, and skips stray bytes between
    packets (QEMU sends none, but a half-read connection must not wedge the parser).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Ack | Packet]:
        self._buf += data
        while self._buf:
            first = self._buf[0]
            if first in (0x2B, 0x2D):  # '+', '-'
                del self._buf[0]
                yield Ack(first == 0x2B)
                continue
            if first != 0x24:  # '$'
                # Junk between packets: drop it up to the next byte that starts something.
                cut = next((i for i, b in enumerate(self._buf) if b in (0x24, 0x2B, 0x2D)), len(self._buf))
                log.debug("rsp: skipping %r between packets", bytes(self._buf[:cut]))
                del self._buf[:cut]
                continue
            end = self._buf.find(b"#")
            if end < 0 or len(self._buf) < end + 3:
                return  # incomplete: wait for more bytes
            body = bytes(self._buf[1:end])
            sent_sum = bytes(self._buf[end + 1 : end + 3])
            del self._buf[: end + 3]
            try:
                expected = int(sent_sum, 16)
            except ValueError as err:
                raise ConduitError(f"malformed RSP checksum {sent_sum!r}") from err
            if checksum(body) != expected:
                raise ConduitError(
                    f"RSP checksum mismatch: got {expected:02x}, computed {checksum(body):02x} for {body[:60]!r}"
                )
            yield Packet(decode_body(body))


# --------------------------------------------------------------------------------------------
# Thread ids and stop replies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ThreadId:
    """A multiprocess thread id ``p<pid>.<tid>``; QEMU numbers vCPU *i* as thread *i + 1*."""

    pid: int
    tid: int

    @classmethod
    def parse(cls, text: str) -> ThreadId:
        m = re.fullmatch(r"p([0-9a-fA-F]+)\.([0-9a-fA-F]+)", text) or re.fullmatch(r"([0-9a-fA-F]+)", text)
        if m is None:
            raise ConduitError(f"unparseable thread id {text!r}")
        if m.lastindex == 2:
            return cls(int(m.group(1), 16), int(m.group(2), 16))
        return cls(1, int(m.group(1), 16))

    def __str__(self) -> str:
        return f"p{self.pid:02x}.{self.tid:02x}"

    @property
    def vcpu(self) -> int:
        """The vCPU index (QEMU's ``cpu_index``) this thread stands for."""
        return self.tid - 1

    @classmethod
    def for_vcpu(cls, index: int, pid: int = 1) -> ThreadId:
        return cls(pid, index + 1)


@dataclass(frozen=True)
class StopReply:
    """A parsed stop reply: ``T05thread:p01.02;``, ``S02``, ``W00``, ``X09``."""

    kind: str  # 'T', 'S', 'W' (exited) or 'X' (killed)
    signal: int  # the signal (T/S/X) or exit status (W)
    thread: ThreadId | None = None
    info: dict[str, str] = field(default_factory=dict)
    received_ns: int = 0  # time.perf_counter_ns() when the reader saw it; for latency measurement

    @property
    def exited(self) -> bool:
        return self.kind in ("W", "X")


def parse_stop_reply(payload: bytes | str, received_ns: int = 0) -> StopReply:
    """Parse a stop reply; raise :class:`ConduitError` if it is not one."""
    text = payload.decode("ascii", "replace") if isinstance(payload, bytes) else payload
    if len(text) < 3 or text[0] not in "TSWX":
        raise ConduitError(f"not a stop reply: {text[:60]!r}")
    try:
        signal = int(text[1:3], 16)
    except ValueError as err:
        raise ConduitError(f"bad signal in stop reply {text[:60]!r}") from err
    info: dict[str, str] = {}
    thread: ThreadId | None = None
    if text[0] == "T":
        for item in text[3:].split(";"):
            if not item:
                continue
            key, sep, value = item.partition(":")
            if not sep:
                raise ConduitError(f"bad field {item!r} in stop reply {text[:60]!r}")
            info[key] = value
        if "thread" in info:
            thread = ThreadId.parse(info["thread"])
    return StopReply(text[0], signal, thread, info, received_ns)


# --------------------------------------------------------------------------------------------
# Registers
# --------------------------------------------------------------------------------------------


@dataclass
class CoreRegs:
    """The ``g`` block: x0..x30, sp, pc, cpsr (32-bit in QEMU's XML, written via pstate_write)."""

    x: list[int]
    sp: int
    pc: int
    cpsr: int

    @classmethod
    def unpack(cls, data: bytes) -> CoreRegs:
        if len(data) != CORE_FORMAT.size:
            raise ConduitError(f"'g' reply is {len(data)} bytes, expected {CORE_FORMAT.size} (x0-x30, sp, pc, cpsr)")
        values = CORE_FORMAT.unpack(data)
        return cls(list(values[:31]), values[31], values[32], values[33])

    def pack(self) -> bytes:
        return CORE_FORMAT.pack(*self.x, self.sp, self.pc, self.cpsr & 0xFFFF_FFFF)

    def copy(self) -> CoreRegs:
        return CoreRegs(list(self.x), self.sp, self.pc, self.cpsr)


class RegisterInfo(NamedTuple):
    """One register of the target description (a tuple: made ~230 times inside a migration's
    downtime, where a frozen dataclass's construction was a third of the parse)."""

    name: str
    regnum: int
    bitsize: int


_INCLUDE_RE = re.compile(r"<xi:include\s+href\s*=\s*[\"']([^\"']+)[\"']")
_REG_RE = re.compile(r"<reg\b([^>]*)>")  # the element's attributes (and a trailing "/")
# Only the attributes used: a migration destination parses ~230 registers inside its downtime,
# and matching every attribute (group, type) of each took twice as long.
_ATTR_RE = re.compile(r"\b(name|bitsize|regnum)\s*=\s*[\"']([^\"']*)[\"']")


def parse_feature_includes(xml: str) -> list[str]:
    """The ``xi:include`` targets of a target description, in document order.

    Parsed with regexes because QEMU's target.xml uses the ``xi:`` prefix without declaring it,
    which XML parsers (rightly) reject.
    """
    return _INCLUDE_RE.findall(xml)


def parse_feature_registers(xml: str, first_regnum: int) -> list[RegisterInfo]:
    """The ``<reg>`` elements of one feature document, numbered as GDB numbers them.

    Registers without a ``regnum`` attribute take the number after the previous register, starting
    at ``first_regnum`` (the next number after the previous document).
    """
    regs: list[RegisterInfo] = []
    nxt = first_regnum
    for m in _REG_RE.finditer(xml):
        attrs = dict(_ATTR_RE.findall(m.group(1)))
        if "name" not in attrs or "bitsize" not in attrs:
            raise ConduitError(f"register element without name/bitsize in target description: {m.group(0)!r}")
        num = int(attrs["regnum"]) if "regnum" in attrs else nxt
        regs.append(RegisterInfo(attrs["name"], num, int(attrs["bitsize"])))
        nxt = num + 1
    return regs


class RegisterMap:
    """Register names to numbers, as learned from the target description.

    System register numbers are generated at run time by QEMU and depend on the CPU model, so they
    are always looked up by name. Some AArch64 registers are exposed under AArch32-style names
    (VBAR_EL1 is ``VBAR``), so lookups fall back through known aliases.
    """

    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {
        "VBAR_EL1": ("VBAR",),
        "SCTLR_EL1": ("SCTLR",),
    }

    def __init__(self, registers: Iterable[RegisterInfo]) -> None:
        self._by_name: dict[str, RegisterInfo] = {}
        for reg in registers:
            self._by_name.setdefault(reg.name.upper(), reg)

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def find(self, name: str) -> RegisterInfo | None:
        key = name.upper()
        for candidate in (key, *self.ALIASES.get(key, ())):
            if candidate in self._by_name:
                return self._by_name[candidate]
        return None

    def __getitem__(self, name: str) -> RegisterInfo:
        reg = self.find(name)
        if reg is None:
            raise ConduitError(f"the gdbstub does not expose register {name}")
        return reg


def _hex_bytes(payload: bytes, what: str) -> bytes:
    try:
        return bytes.fromhex(payload.decode("ascii"))
    except ValueError as err:
        raise ConduitError(f"{what}: expected hex, got {payload[:60]!r}") from err


def _is_error(reply: bytes) -> bool:
    """``Exx``: the gdbstub's error reply."""
    return reply.startswith(b"E") and len(reply) == 3


_XFER_ASK = 0xF00  # bytes asked per qXfer chunk: below PacketSize=0x1000 with room for framing


def _xfer_chunk(reply: bytes, what: str) -> tuple[bytes, bool]:
    """The data of one ``qXfer`` reply, and whether it was the last (``l``)."""
    if not reply or reply[0] not in b"ml":
        raise ConduitError(f"{what} failed: {reply[:60]!r}")
    return reply[1:], reply[0] == ord("l")


def _check_ok(reply: bytes, what: str) -> None:
    if reply != b"OK":
        raise ConduitError(f"{what} failed: gdbstub replied {reply[:60]!r}")


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class RspClient:
    """One connection to a gdbstub.

    A reader task decodes everything QEMU sends. Replies resolve the oldest outstanding request
    (requests are answered in order), stop replies are queued for :meth:`wait_stop`. Senders
    never wait for each other's replies before writing, which is what allows pipelining.

    It does not track whether the VM runs; the caller (the conduit) knows when it has resumed the
    VM and must only send :meth:`interrupt` then, and only requests while the VM is stopped.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.timeout = timeout
        self._reader = reader
        self._writer = writer
        self._pending: deque[asyncio.Future[bytes]] = deque()
        self._stops: asyncio.Queue[StopReply | ConduitError] = asyncio.Queue()
        self._closed_error: ConduitError | None = None
        self._decoder = PacketDecoder()
        self._task = asyncio.create_task(self._read_loop(), name="rsp.reader")
        self.supported: dict[str, str] = {}
        self.peer_closed = False  # QEMU closed the socket (it exits without a W packet on poweroff)
        self.attach_stops: list[StopReply] = []  # the T02 QEMU 7.2 pushes when we attach to a running VM
        self.packets_sent = 0
        #: stop replies read so far. A request sent after an 0x03 is answered after the stop
        #: reply that 0x03 caused, so comparing this before and after its reply tells whether
        #: the 0x03 stopped the VM (see GdbstubConduit.owner_resumed).
        self.stops_received = 0
        # QEMU sent a packet after it read our last one: it keeps that packet for a resend until
        # it sees our next '$' or '+', and until then ignores any other byte, a 0x03 included.
        # Replies to earlier packets of a pipelined write do not count: the next '$' released them.
        self._peer_keeps_packet = False
        self._last_sent_reply: asyncio.Future[bytes] | None = None  # if our last packet has a reply

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> RspClient:
        """Connect and run the ``qSupported`` handshake.

        If the VM was running, QEMU has paused it; 7.2 also queues an unsolicited ``T02``, which
        is consumed here (it always precedes our first reply on the stream; 8.1 and later send
        none), so callers start from a clean stop queue with the VM stopped either way.
        """
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as err:
            raise ConduitError(f"cannot connect to the gdbstub at {host}:{port}: {err}") from err
        client = cls(reader, writer, timeout=timeout)
        try:
            await client.query_supported()
            client.attach_stops = client.drain_stops()
        except BaseException:
            await client.close()
            raise
        return client

    # ---- raw I/O --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        error: ConduitError
        try:
            while data := await self._reader.read(65536):
                now = time.perf_counter_ns()
                for item in self._decoder.feed(data):
                    if isinstance(item, Ack):
                        if not item.ok:
                            raise ConduitError("the gdbstub asked for a resend ('-'): our packet was corrupted")
                        continue
                    self._dispatch(item.payload, now)
            self.peer_closed = True
            error = ConduitError("the gdbstub closed the connection")
        except ConduitError as err:
            error = err
        except OSError as err:
            self.peer_closed = True
            error = ConduitError(f"gdbstub connection failed: {err}")
        self._fail_all(error)

    def _dispatch(self, payload: bytes, received_ns: int) -> None:
        if payload and payload[0] in _STOP_KINDS:
            self.stops_received += 1
            self._peer_keeps_packet = True  # we send nothing while the VM runs, but a 0x03
            self._stops.put_nowait(parse_stop_reply(payload, received_ns))
            return
        while self._pending:
            fut = self._pending.popleft()
            if fut is self._last_sent_reply:
                self._peer_keeps_packet = True
            if not fut.done():  # a request that timed out keeps its slot so replies stay aligned
                fut.set_result(payload)
                return
        log.warning("rsp: reply %r arrived with no request outstanding", payload[:60])

    def _fail_all(self, error: ConduitError) -> None:
        self._closed_error = error
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # a request given up on (timed out) has nobody to retrieve it
        self._stops.put_nowait(error)

    def _check_open(self) -> None:
        if self._closed_error is not None:
            raise ConduitError(str(self._closed_error)) from self._closed_error

    def send(self, *payloads: bytes | str, expect_reply: Iterable[bool] | None = None) -> list[asyncio.Future[bytes]]:
        """Frame and write several packets in one write; return a future per packet expecting a reply.

        ``expect_reply`` says, per packet, whether it gets a normal reply (default: all do).
        Resume packets (``vCont;c``, ``vCont;s``, ``c``) get a *stop* reply instead and must be
        marked ``False``. One write matters: QEMU processes it in one go, so ``G`` + ``vCont;c``
        costs one round trip instead of two.
        """
        self._check_open()
        flags = list(expect_reply) if expect_reply is not None else [True] * len(payloads)
        if len(flags) != len(payloads):
            raise ValueError("expect_reply must have one flag per payload")
        if not payloads:
            return []  # nothing sent: the ack state below stays as QEMU left it
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bytes]] = []
        for wants in flags:
            if wants:
                fut: asyncio.Future[bytes] = loop.create_future()
                self._pending.append(fut)
                futures.append(fut)
        self._writer.write(b"".join(frame(p) for p in payloads))
        self._peer_keeps_packet = False  # our '$' ends QEMU's wait for an ack
        self._last_sent_reply = futures[-1] if flags and flags[-1] else None
        self.packets_sent += len(payloads)
        return futures

    async def reply(self, fut: asyncio.Future[bytes], what: str, timeout: float | None = None) -> bytes:
        """Wait for a reply future from :meth:`send`, with a timeout and a clear error."""
        if fut.done():  # pipelined packets: later replies have usually arrived with the first
            return fut.result()
        try:
            # Shielded: a request given up on keeps its slot in _pending (replies stay aligned).
            # asyncio.timeout costs less per call than wait_for, which wraps the future again.
            async with asyncio.timeout(timeout or self.timeout):
                return await asyncio.shield(fut)
        except TimeoutError as err:
            raise ConduitError(f"no reply to {what} within {timeout or self.timeout}s") from err

    async def request(self, payload: bytes | str, timeout: float | None = None) -> bytes:
        """Send one packet and return its reply body."""
        (fut,) = self.send(payload)
        what = payload[:40] if isinstance(payload, str) else payload[:40].decode("ascii", "replace")
        return await self.reply(fut, repr(what), timeout)

    def interrupt(self) -> None:
        """Send the raw 0x03 byte: a running VM stops and QEMU sends ``T02``.

        Only meaningful while the VM runs. QEMU discards it when the VM is already stopped. If
        QEMU's last packet (a reply) is still kept for a resend, a ``+`` goes first: while QEMU
        keeps a packet that ``+`` only releases it; otherwise the 0x03 would be ignored. (A ``+``
        reaching a running VM with nothing kept would stop it, on 8.1+ without a stop reply,
        which is why it is only sent when QEMU answered our last packet or sent a stop since.)
        """
        self._check_open()
        self._writer.write(b"+" + INTERRUPT if self._peer_keeps_packet else INTERRUPT)
        self._peer_keeps_packet = False

    async def wait_stop(self, timeout: float | None = None, *, forever: bool = False) -> StopReply:
        """Wait for the next stop reply (``forever``: a running guest may not stop for hours)."""
        try:
            item = await asyncio.wait_for(self._stops.get(), None if forever else timeout or self.timeout)
        except TimeoutError as err:
            raise ConduitError(f"the VM did not stop within {timeout or self.timeout}s") from err
        if isinstance(item, ConduitError):
            self._stops.put_nowait(item)  # keep failing every later waiter too
            raise ConduitError(str(item)) from item
        return item

    def stop_queued(self) -> bool:
        """Whether a stop reply (or the connection's end) waits to be taken by :meth:`wait_stop`."""
        return not self._stops.empty()

    def drain_stops(self) -> list[StopReply]:
        """Take every already-received stop reply (e.g. the unsolicited ``T02`` on attach)."""
        out: list[StopReply] = []
        while not self._stops.empty():
            item = self._stops.get_nowait()
            if isinstance(item, ConduitError):
                self._stops.put_nowait(item)
                break
            out.append(item)
        return out

    async def close(self) -> None:
        """Close the socket without detaching (QEMU then leaves the VM paused)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConduitError):
            await self._task
        if self._closed_error is None:
            self._fail_all(ConduitError("the RSP client was closed"))
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    # ---- typed helpers ----------------------------------------------------------------------

    async def query_supported(self) -> dict[str, str]:
        reply = (await self.request("qSupported:multiprocess+;vContSupported+;xmlRegisters=aarch64")).decode()
        features: dict[str, str] = {}
        for item in reply.split(";"):
            if not item:
                continue
            if "=" in item:
                key, value = item.split("=", 1)
                features[key] = value
            else:
                features[item[:-1]] = item[-1]
        self.supported = features
        return features

    async def threads(self, expected: int = 0) -> list[ThreadId]:
        """All threads (vCPUs), via ``qfThreadInfo``/``qsThreadInfo``.

        QEMU names one thread per reply, a round trip each; ``expected`` (the vCPU count, when
        known) sends that many ``qsThreadInfo`` with the first request, in one write. A guess too
        small only costs the round trips it did not save; the replies past the end are ``l``.
        """
        found: list[ThreadId] = []
        futures = self.send("qfThreadInfo", *["qsThreadInfo"] * expected)
        ended = False
        for fut in futures:
            reply = await self.reply(fut, "thread list")
            if not ended:
                ended = self._thread_reply(reply, found)
        while not ended:
            ended = self._thread_reply(await self.request("qsThreadInfo"), found)
        return found

    @staticmethod
    def _thread_reply(reply: bytes, found: list[ThreadId]) -> bool:
        """Add the threads a ``q[fs]ThreadInfo`` reply names; True at the list's end (``l``)."""
        if reply.startswith(b"m"):
            found += [ThreadId.parse(t) for t in reply[1:].decode().split(",") if t]
            return False
        if reply != b"l":
            raise ConduitError(f"unexpected thread list reply {reply[:60]!r}")
        return True

    async def read_xfer(self, obj: str, annex: str, *, ahead: int = 8) -> bytes:
        """Read a whole ``qXfer:<obj>:read:<annex>`` object in chunks.

        The first reply shows how much the gdbstub serves per chunk (QEMU 7.2 cuts our request
        to its packet size); the rest is asked for ``ahead`` chunks per write, as a round trip per
        chunk added up to milliseconds where it is downtime (a migration destination).
        """
        (data,) = await self.read_xfers(obj, [annex], ahead=ahead)
        return data

    async def read_xfers(self, obj: str, annexes: Sequence[str], *, ahead: int = 8) -> list[bytes]:
        """:meth:`read_xfer` for several objects at once: their first chunks in one write, then
        the rest of each that did not end, all pipelined (on a migration destination the register
        map's documents one after the other cost milliseconds of downtime)."""
        futures = self.send(*(f"qXfer:{obj}:read:{annex}:0,{_XFER_ASK:x}" for annex in annexes))
        firsts = []
        for annex, fut in zip(annexes, futures, strict=True):
            what = f"qXfer {obj}/{annex}"
            firsts.append((annex, *_xfer_chunk(await self.reply(fut, what), what)))
        # Each sends its next chunks before it waits for a reply: one round trip for them all.
        rests = (self._xfer_rest(obj, annex, first, ended, ahead) for annex, first, ended in firsts)
        return list(await asyncio.gather(*rests))

    async def _xfer_rest(self, obj: str, annex: str, first: bytes, ended: bool, ahead: int) -> bytes:
        what = f"qXfer {obj}/{annex}"
        data = bytearray(first)
        served = len(first)
        if not ended and not served:
            raise ConduitError(f"{what}: the gdbstub sent an empty chunk before the end")
        while not ended:
            base = len(data)
            futures = self.send(*(f"qXfer:{obj}:read:{annex}:{base + i * served:x},{served:x}" for i in range(ahead)))
            in_place = True  # every reply so far started where the previous one ended
            for fut in futures:
                reply = await self.reply(fut, what)
                if not in_place:
                    continue  # past the end (maybe an error reply), or after a short chunk: asked again
                chunk, ended = _xfer_chunk(reply, what)
                data += chunk
                in_place = not ended and len(chunk) == served
            if not ended and len(data) == base:
                raise ConduitError(f"{what}: the gdbstub sent an empty chunk before the end")
        return bytes(data)

    async def read_register_map(self) -> RegisterMap:
        """Read target.xml and everything it includes, and number the registers."""
        target = (await self.read_xfer("features", "target.xml")).decode()
        registers = parse_feature_registers(target, 0)
        nxt = registers[-1].regnum + 1 if registers else 0
        hrefs = parse_feature_includes(target)
        for raw in await self.read_xfers("features", hrefs):  # numbered in the order included
            doc = raw.decode()
            regs = parse_feature_registers(doc, nxt)
            if regs:
                nxt = max(r.regnum for r in regs) + 1
            registers += regs
        return RegisterMap(registers)

    async def select_thread(self, thread: ThreadId) -> None:
        """``Hg``: make ``g``/``G``/``p``/``P``/``m``/``M`` act on ``thread``."""
        _check_ok(await self.request(f"Hg{thread}"), f"Hg{thread}")

    async def read_core(self) -> CoreRegs:
        return CoreRegs.unpack(_hex_bytes(await self.request("g"), "'g' reply"))

    async def read_core_of(self, thread: ThreadId) -> CoreRegs:
        """``Hg<thread>`` and ``g`` in one write: another vCPU's registers in one round trip."""
        select, read = self.send(f"Hg{thread}", "g")
        _check_ok(await self.reply(select, f"Hg{thread}"), f"Hg{thread}")
        return CoreRegs.unpack(_hex_bytes(await self.reply(read, "'g'"), "'g' reply"))

    async def read_core_and_memory(
        self, *regions: tuple[int, int], thread: ThreadId | None = None
    ) -> tuple[CoreRegs, list[bytes]]:
        """``g`` and an ``m`` per region (``(address, length)``) in one write, preceded by
        ``Hg<thread>`` when given: a vCPU's registers and pieces of memory in one round trip."""
        packets = ([f"Hg{thread}"] if thread is not None else []) + ["g"] + [f"m{a:x},{n:x}" for a, n in regions]
        futures = self.send(*packets)
        if thread is not None:
            _check_ok(await self.reply(futures.pop(0), f"Hg{thread}"), f"Hg{thread}")
        core = CoreRegs.unpack(_hex_bytes(await self.reply(futures[0], "'g'"), "'g' reply"))
        memory = [
            self._memory_reply(await self.reply(fut, f"'m{addr:x}'"), addr, length)
            for (addr, length), fut in zip(regions, futures[1:], strict=True)
        ]
        return core, memory

    @staticmethod
    def core_packet(regs: CoreRegs) -> bytes:
        return b"G" + regs.pack().hex().encode("ascii")

    async def write_core(self, regs: CoreRegs) -> None:
        _check_ok(await self.request(self.core_packet(regs)), "G")

    async def read_register(self, regnum: int) -> int:
        data = _hex_bytes(await self.request(f"p{regnum:x}"), f"'p{regnum:x}' reply")
        return int.from_bytes(data, "little")

    async def write_register(self, regnum: int, value: int, size: int = 8) -> None:
        """``P``. Note: QEMU replies OK to system register writes but ignores them."""
        _check_ok(await self.request(f"P{regnum:x}={value.to_bytes(size, 'little').hex()}"), f"P{regnum:x}")

    async def read_memory(self, addr: int, length: int) -> bytes:
        return self._memory_reply(await self.request(f"m{addr:x},{length:x}"), addr, length)

    async def read_memory_regions(self, regions: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Several ``m`` reads in one write (one round trip instead of one each); ``None`` for a
        region the gdbstub would not read (an error reply: nothing mapped there). Other bad
        replies raise :class:`ConduitError`, as :meth:`read_memory` does."""
        futures = self.send(*(f"m{addr:x},{length:x}" for addr, length in regions))
        found: list[bytes | None] = []
        for (addr, length), fut in zip(regions, futures, strict=True):
            reply = await self.reply(fut, f"'m{addr:x}'")
            found.append(None if _is_error(reply) else self._memory_reply(reply, addr, length))
        return found

    @staticmethod
    def _memory_reply(reply: bytes, addr: int, length: int) -> bytes:
        if _is_error(reply):
            raise ConduitError(f"cannot read {length} bytes at {addr:#x}: {reply.decode()}")
        data = _hex_bytes(reply, f"'m{addr:x}' reply")
        if len(data) != length:
            raise ConduitError(f"short memory read at {addr:#x}: {len(data)} of {length} bytes")
        return data

    async def write_memory(self, addr: int, data: bytes) -> None:
        _check_ok(await self.request(f"M{addr:x},{len(data):x}:{data.hex()}"), f"M{addr:x}")

    async def insert_breakpoint(self, addr: int, kind: int = 4) -> None:
        """``Z0``: a breakpoint on every vCPU, hit *before* the instruction executes."""
        _check_ok(await self.request(f"Z0,{addr:x},{kind:x}"), f"Z0 at {addr:#x}")

    async def insert_breakpoints(self, addrs: Iterable[int], kind: int = 4) -> None:
        """:meth:`insert_breakpoint` for each address, all in one write (one round trip)."""
        await self._breakpoint_batch("Z0", addrs, kind)

    async def remove_breakpoint(self, addr: int, kind: int = 4) -> None:
        _check_ok(await self.request(f"z0,{addr:x},{kind:x}"), f"z0 at {addr:#x}")

    async def remove_breakpoints(self, addrs: Iterable[int], kind: int = 4) -> None:
        """:meth:`remove_breakpoint` for each address, all in one write (one round trip)."""
        await self._breakpoint_batch("z0", addrs, kind)

    async def _breakpoint_batch(self, op: str, addrs: Iterable[int], kind: int) -> None:
        """``op`` (``Z0``/``z0``) at each address in one write; every reply must be ``OK``."""
        ordered = list(addrs)
        futures = self.send(*(f"{op},{addr:x},{kind:x}" for addr in ordered))
        for addr, fut in zip(ordered, futures, strict=True):
            _check_ok(await self.reply(fut, f"{op} at {addr:#x}"), f"{op} at {addr:#x}")

    async def insert_watchpoint(self, addr: int, length: int = 8) -> None:
        """``Z2``: a write watchpoint on every vCPU. QEMU stops the VM *after* the store, and
        reports it as ``T05...;watch:<addr>;``."""
        _check_ok(await self.request(f"Z2,{addr:x},{length:x}"), f"Z2 at {addr:#x}")

    async def remove_watchpoint(self, addr: int, length: int = 8) -> None:
        _check_ok(await self.request(f"z2,{addr:x},{length:x}"), f"z2 at {addr:#x}")

    def resume(self, *, step: ThreadId | None = None, others_continue: bool = True) -> None:
        """Resume the VM (no reply until it stops again; see :meth:`wait_stop`).

        ``step=None``: continue every vCPU. ``step=t, others_continue=False``: step only ``t``, the
        other vCPUs stay stopped. ``step=t, others_continue=True``: step ``t`` while the rest run;
        used for pass-through calls that may never come back (CPU_OFF), where waiting for the step
        alone would hang.
        """
        self.send(self.resume_packet(step=step, others_continue=others_continue), expect_reply=[False])

    @staticmethod
    def resume_packet(*, step: ThreadId | None = None, others_continue: bool = True) -> str:
        if step is None:
            return "vCont;c"
        return f"vCont;s:{step};c" if others_continue else f"vCont;s:{step}"

    async def step(self, thread: ThreadId, timeout: float | None = None) -> StopReply:
        """Single-step one vCPU (the others stay stopped) and wait for it to stop."""
        self.resume(step=thread, others_continue=False)
        return await self.wait_stop(timeout)

    async def detach(self) -> None:
        """``D;1``: remove our breakpoints and let the VM run. Plain ``D`` is refused (multiprocess)."""
        _check_ok(await self.request("D;1"), "detach")
