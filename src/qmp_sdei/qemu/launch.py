"""Start and stop a ``qemu-system-aarch64`` process with the monitors the sidecar needs.

Used by the tests, by ``qmp-sdei boot-test`` and by the demo. It starts QEMU with:

* a control monitor for the sidecar (``-chardev socket,id=sdei,... -mon chardev=sdei,mode=control``),
  either as a server socket the sidecar connects to, or as a client that connects to a sidecar
  listening first (``sidecar_listens=True``);
* a second, separate QMP monitor for whoever launched it (tests drive ``system_reset``, ``quit``...
  there; qemu.qmp allows one client per monitor, and events are broadcast to all monitors);
* the guest's PL011 UART on stdout, collected so callers can wait for a line with a timeout.

It must not know anything about SDEI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import ConnectError, QMPClient

from qmp_sdei.errors import QemuError

QEMU_BINARY = "qemu-system-aarch64"

#: the id of the shared guest-RAM backend :attr:`QemuSpec.shared_ram` adds (``-M virt,memory-backend=``)
SHARED_RAM_ID = "qsdei-ram"


def shared_ram_args(memory_mb: int, path: Path | None = None) -> list[str]:
    """The ``-object`` that backs guest RAM with a shared memfd of ``memory_mb`` MiB, or with the
    file at ``path`` (``memory-backend-file``; QEMU creates it if missing and never removes it, but
    frees its pages when it exits).

    ``share=on`` makes QEMU map the file ``MAP_SHARED``, so another process that maps the same
    file (the sidecar, see :mod:`qmp_sdei.qemu.guestram`) sees the guest's writes and the guest
    sees its writes. The sidecar finds a memfd among QEMU's open files; a path it opens itself,
    which needs no access to QEMU's ``/proc``. The machine must name it (``memory-backend=``,
    :data:`SHARED_RAM_ID`), and ``-m`` must stay equal to its size: QEMU 7.2 and 10 both refuse a
    mismatch.
    """
    if path is None:
        return ["-object", f"memory-backend-memfd,id={SHARED_RAM_ID},size={memory_mb}M,share=on"]
    mem_path = str(path).replace(",", ",,")  # QEMU's option syntax doubles a comma inside a value
    # discard-data: a QEMU that exits frees the file's pages (it stays, empty, for the next run)
    backend = f"memory-backend-file,id={SHARED_RAM_ID},size={memory_mb}M,mem-path={mem_path},share=on,discard-data=on"
    return ["-object", backend]


@dataclass
class QemuSpec:
    """What to start. Defaults give an idle ``-M virt -S`` machine with no guest."""

    smp: int = 1
    memory_mb: int = 256
    cpu: str = "cortex-a57"
    machine: str = "virt"
    machine_options: dict[str, str] = field(default_factory=dict)
    kernel: Path | None = None
    dtb: Path | None = None
    append: str | None = None
    paused: bool = True  # -S: nothing runs until someone sends cont
    gdb: str | None = None  # e.g. "tcp:127.0.0.1:1234"; None leaves the stub off
    sidecar_listens: bool = False  # True: QEMU connects out to a sidecar's socket (reconnect=1)
    name: str | None = None
    uuid: str | None = None
    extra_args: Sequence[str] = ()
    # Guest RAM in a shared memfd (shared_ram_args) the sidecar can map, instead of QEMU's
    # private anonymous memory: what the EL2 stub's mailbox fast path needs.
    shared_ram: bool = False
    # With shared_ram: the file to keep it in (memory-backend-file) instead of a memfd
    shared_ram_path: Path | None = None

    def machine_arg(self) -> str:
        """The ``-M`` value: the machine, its options, and with :attr:`shared_ram` its RAM backend."""
        options = dict(self.machine_options)
        if self.shared_ram:
            options["memory-backend"] = SHARED_RAM_ID
        return ",".join([self.machine, *(f"{k}={v}" for k, v in options.items())])

    def memory_args(self) -> list[str]:
        """``-m`` and, with :attr:`shared_ram`, the backend object (its size is ``-m``'s)."""
        backend = shared_ram_args(self.memory_mb, self.shared_ram_path) if self.shared_ram else []
        return ["-m", str(self.memory_mb), *backend]

    def argv(self, workdir: Path) -> list[str]:
        """The full command line, with sockets placed in ``workdir``."""
        sidecar = workdir / "sidecar-qmp.sock"
        chardev = f"socket,id=sdei,path={sidecar}"
        chardev += ",reconnect=1" if self.sidecar_listens else ",server=on,wait=off"
        args = [
            QEMU_BINARY, "-nodefaults", "-no-user-config",
            "-M", self.machine_arg(), "-cpu", self.cpu, "-smp", str(self.smp), *self.memory_args(),
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-chardev", chardev, "-mon", "chardev=sdei,mode=control",
            "-qmp", f"unix:{workdir / 'harness-qmp.sock'},server=on,wait=off",
        ]  # fmt: skip
        if self.paused:
            args.append("-S")
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel)]
        if self.dtb is not None:
            args += ["-dtb", str(self.dtb)]
        if self.append is not None:
            args += ["-append", self.append]
        if self.gdb is not None:
            args += ["-gdb", self.gdb]
        if self.name is not None:
            args += ["-name", self.name]
        if self.uuid is not None:
            args += ["-uuid", self.uuid]
        args += list(self.extra_args)
        return args


class QemuProcess:
    """A running QEMU. Use as ``async with QemuProcess(spec, workdir) as vm:``; it is always stopped."""

    def __init__(self, spec: QemuSpec, workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir
        self.process: asyncio.subprocess.Process | None = None
        self._console = bytearray()
        self._console_changed = asyncio.Condition()
        self._stderr = bytearray()
        self._readers: list[asyncio.Task[None]] = []

    @property
    def sidecar_socket(self) -> Path:
        return self.workdir / "sidecar-qmp.sock"

    @property
    def harness_socket(self) -> Path:
        return self.workdir / "harness-qmp.sock"

    @property
    def console(self) -> str:
        """Everything the guest wrote to its UART so far."""
        return self._console.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    async def start(self) -> None:
        if shutil.which(QEMU_BINARY) is None:
            raise QemuError(f"{QEMU_BINARY} not found on PATH (Debian package qemu-system-arm)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            *self.spec.argv(self.workdir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to the test runner must not reach QEMU first
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            asyncio.create_task(self._pump(self.process.stdout, self._console), name="qemu.console"),
            asyncio.create_task(self._pump(self.process.stderr, self._stderr), name="qemu.stderr"),
        ]
        if not self.spec.sidecar_listens:
            await self._wait_for_socket(self.sidecar_socket)
        await self._wait_for_socket(self.harness_socket)

    async def _wait_for_socket(self, path: Path, timeout: float = 30.0) -> None:
        async def poll() -> None:
            while not path.exists():
                if self.process is not None and self.process.returncode is not None:
                    raise QemuError(f"QEMU exited with {self.process.returncode}: {self.stderr.strip()}")
                await asyncio.sleep(0.01)  # polling a file that QEMU creates; no event to wait on

        try:
            await asyncio.wait_for(poll(), timeout)
        except TimeoutError as err:
            raise QemuError(f"QEMU did not create {path} within {timeout}s") from err

    async def _pump(self, stream: asyncio.StreamReader, sink: bytearray) -> None:
        while chunk := await stream.read(4096):
            sink.extend(chunk)
            if sink is self._console:
                async with self._console_changed:
                    self._console_changed.notify_all()
        async with self._console_changed:
            self._console_changed.notify_all()

    async def wait_for_console(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the guest's console output matches ``pattern``; raise ``TimeoutError`` otherwise."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        async def wait() -> re.Match[str]:
            async with self._console_changed:
                while True:
                    match = regex.search(self.console)
                    if match:
                        return match
                    if self.process is None or self.process.returncode is not None or self._readers_done():
                        raise QemuError(f"QEMU exited before the console matched {regex.pattern!r}")
                    await self._console_changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    def _readers_done(self) -> bool:
        return all(task.done() for task in self._readers)

    async def connect_harness(self, timeout: float, name: str = "qemu-harness") -> QMPClient:
        """A qemu.qmp client connected to the harness monitor (the caller disconnects it).

        QEMU creates the socket file (which :meth:`start` waits for) before it listens, and says
        nothing when it starts listening, so a refused connection is retried until ``timeout``.
        """
        # qemu.qmp logs every refused attempt as an error; here they are expected.
        logging.getLogger(f"qemu.qmp.protocol.{name}").setLevel(logging.CRITICAL)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            client = QMPClient(name)
            remaining = max(0.1, deadline - asyncio.get_running_loop().time())
            try:
                await asyncio.wait_for(client.connect(str(self.harness_socket)), remaining)
                return client
            except ConnectError as err:
                refused = isinstance(err.exc, ConnectionRefusedError)
                if not refused or asyncio.get_running_loop().time() > deadline:
                    raise QemuError(f"cannot connect to QEMU's harness monitor: {err}") from err
            await asyncio.sleep(0.02)  # no signal to wait on: QEMU does not announce that it listens

    async def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself and return its exit status."""
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    async def stop(self, timeout: float = 10.0) -> None:
        """Terminate QEMU (SIGTERM, then SIGKILL) and collect its output."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.kill(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.kill(signal.SIGKILL)
                await self.process.wait()
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout)

    async def __aenter__(self) -> QemuProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
