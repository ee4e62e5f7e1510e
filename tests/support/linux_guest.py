"""Build and boot the Linux SDEI event guest: a stock Debian arm64 kernel, an initramfs with a tiny
static ``/init`` that loads ``sdei_test.ko``, and the whole sidecar in-process.

Builders (all cached under the qmp-sdei cache root, keyed by their inputs, written to a temporary
name and renamed so concurrent runs never see half a file):

* :func:`fetch_kernel_headers`: the kernel's ``linux-headers-*-arm64:arm64`` and the common headers
  and kbuild packages it depends on, at the kernel's exact version, fetched with ``apt-get
  download`` and unpacked with ``dpkg-deb -x`` (nothing is installed). The arm64 headers' Makefile includes the
  common tree by its absolute ``/usr/src`` path; the cached copy is pointed at its own tree.
* :func:`build_module`: ``tests/guests/linux-module`` built out of tree with
  ``ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-`` in a scratch copy; kbuild then calls the gcc
  release the headers name (``aarch64-linux-gnu-gcc-12`` on bookworm, ``-14`` on trixie).
* :func:`build_init`: ``init.c`` as a static aarch64 binary (the cross glibc, no busybox).
* :func:`write_initramfs`: a ``newc`` cpio written here (``/init``, the module, its parameters, and
  ``/dev/console`` + ``/dev/kmsg`` nodes, so nothing has to be mounted).

Linux 6.1 does not export ``sdei_event_register``/``sdei_event_enable``; the module finds them at
run time (a kprobe's symbol lookup), so the same initramfs serves a KASLR boot. The host's kallsyms
only confirm that the kernel has them.

:class:`LinuxEventVm` boots it all and raises events, timing each one through :class:`EventProbe`,
a thin wrapper around the dispatcher the conduit drives (handler entered, the handler's calls,
its COMPLETE/COMPLETE_AND_RESUME, i.e. the interrupted context resumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmp_sdei.abi.sdei import Function
from qmp_sdei.abi.smccc import function_id
from qmp_sdei.boottest import CPU, MEMORY_MB, qemu_spec
from qmp_sdei.cache import cache_root, locked
from qmp_sdei.conduit.traps import load_kallsyms
from qmp_sdei.config import parse
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.linux_kernel import DebianKernel, fetch_debian_kernel_package
from qmp_sdei.owner import RaiseResult
from qmp_sdei.qemu.dtb import build_sdei_dtb, psci_compatible_for
from qmp_sdei.qemu.launch import QEMU_BINARY, QemuProcess, QemuSpec
from qmp_sdei.sdei import Completion, VcpuRegs
from support.sidecar import until

MODULE_DIR = Path(__file__).resolve().parent.parent / "guests" / "linux-module"
MODULE_SOURCES = ("sdei_test.c", "Kbuild")
INIT_SOURCE = "init.c"
CROSS = "aarch64-linux-gnu-"
INIT_CFLAGS = ["-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror"]
EVENT = 1000
APPEND = "console=ttyAMA0 nokaslr panic=-1 nohlt rdinit=/init printk.devkmsg=on"
EL2_APPEND = "console=ttyAMA0 panic=-1 rdinit=/init printk.devkmsg=on"  # the kernel's defaults otherwise
"""boot-test's command line plus ``rdinit=/init`` and ``printk.devkmsg=on`` (the /init heartbeat goes
through /dev/kmsg, which otherwise rate-limits it to 10 lines per 5 s)."""

READY_LINE = re.compile(r"sdei_test: ready event=(?P<event>\d+) cpus=(?P<cpus>\d+)")
DELIVERY_LINE = (
    r"sdei_test: event (?P<event>\d+) #{n} on CPU (?P<cpu>\d+) arg_ok=(?P<arg_ok>\d) "
    r"pc=(?P<pc>\S+)(?: \[(?P<module>[^\]]+)\])? pstate=(?P<pstate>[0-9a-f]+)\r?\n"
)
"""The callback's line for delivery ``{n}`` (format it); whole lines only, the console may be mid-line.
``%pS`` names the module after a pc inside one: an event raised as soon as the module says it is
ready may interrupt the module's own init (seen in CI runs: "pc=sdei_test_init+0xe8/0x1000 [sdei_test]")."""
DELIVERY_ANY = re.compile(DELIVERY_LINE.format(n=r"(?P<n>\d+)"))
HEARTBEAT = re.compile(r"sdei_test_init: alive (?P<n>\d+)\r?\n")
TROUBLE = re.compile(
    r"Oops|\bBUG\b|WARNING:|Kernel panic|Call trace:|Unable to handle"
    r"|sdei_test(?:_init)?: error:|sdei: .*(?:[Ff]ailed|error)"
)

_ARCH = "arm64"
_TOOLS = ("apt-get", "dpkg-deb", "make", f"{CROSS}gcc", QEMU_BINARY)


class LinuxGuestUnavailable(Exception):
    """A host tool the Linux event guest needs is missing: the tests skip with this message."""


class LinuxGuestBuildError(RuntimeError):
    """The tools are there but a step failed (the message has the tool's output)."""


def check_tools() -> None:
    """Raise :class:`LinuxGuestUnavailable` naming what is missing (apt, dpkg, make, the cross gcc, QEMU)."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        raise LinuxGuestUnavailable(
            f"the Linux event guest needs {', '.join(missing)} (Debian: apt, make, gcc-aarch64-linux-gnu, "
            "libc6-dev-arm64-cross, qemu-system-arm)"
        )


def _run(argv: list[str], what: str, *, timeout: float = 600.0, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    except subprocess.TimeoutExpired as err:
        raise LinuxGuestBuildError(f"{what}: {' '.join(argv)} did not finish within {timeout}s") from err
    if result.returncode != 0:
        raise LinuxGuestBuildError(f"{what} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def _gcc_version(compiler: str = f"{CROSS}gcc") -> str:
    return _run([compiler, "--version"], "asking the cross compiler's version").splitlines()[0]


# ---- kernel headers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderPackages:
    """The three packages an out-of-tree module build for one Debian kernel needs.

    Their names follow the release's scheme (bookworm: ``linux-headers-6.1.0-56-arm64``,
    ``linux-kbuild-6.1``; trixie and the 6.12 backport: ``linux-headers-6.12.117+deb13-arm64``,
    ``linux-kbuild-6.12.117+deb13``), so they are read from the headers package's ``Depends``
    rather than derived from the version.
    """

    headers: str  # "linux-headers-6.1.0-56-arm64": the kernel's architecture
    common: str  # "linux-headers-6.1.0-56-common": Architecture: all
    kbuild: str  # "linux-kbuild-6.1": the host's architecture (fixdep, modpost)
    version: str  # "6.1.192-2", the kernel's: all three are built from its source

    @classmethod
    def for_kernel(cls, kernel: DebianKernel) -> HeaderPackages:
        headers = headers_package_for(kernel.package)
        fields = _run(["apt-cache", "show", f"{headers}:{_ARCH}={kernel.version}"], f"asking apt about {headers}")
        depends = next((line for line in fields.splitlines() if line.startswith("Depends:")), "")
        return cls.from_depends(headers, kernel.version, depends.removeprefix("Depends:"))

    @classmethod
    def from_depends(cls, headers: str, version: str, depends: str) -> HeaderPackages:
        """Pick the common headers and kbuild packages out of the headers package's ``Depends``."""
        names = [
            alt.split()[0].split(":")[0] for clause in depends.split(",") for alt in clause.split("|") if alt.strip()
        ]
        common = next((n for n in names if n.startswith("linux-headers-") and n.endswith("-common")), None)
        kbuild = next((n for n in names if n.startswith("linux-kbuild-")), None)
        if common is None or kbuild is None:
            raise LinuxGuestBuildError(f"{headers} does not depend on common headers and kbuild: {depends.strip()!r}")
        return cls(headers, common, kbuild, version)

    @property
    def release(self) -> str:
        return self.headers.removeprefix("linux-headers-")

    def specs(self) -> list[str]:
        v = self.version
        return [f"{self.headers}:{_ARCH}={v}", f"{self.common}={v}", f"{self.kbuild}={v}"]


def headers_package_for(image_package: str) -> str:
    """``linux-image-<release>[-unsigned]`` -> ``linux-headers-<release>``."""
    match = re.fullmatch(r"linux-image-(?P<release>.+?)(?:-unsigned)?", image_package)
    if match is None:
        raise LinuxGuestBuildError(f"cannot tell the headers package for {image_package}")
    return f"linux-headers-{match['release']}"


def kbuild_compiler(kdir: Path) -> str:
    """The cross compiler kbuild will call for ``kdir``: Debian's headers name the gcc release the
    kernel was built with (``CC = $(CROSS_COMPILE)gcc-12`` on bookworm, ``gcc-14`` on trixie)."""
    variables = kdir / ".kernelvariables"
    text = variables.read_text() if variables.exists() else ""
    match = re.search(r"(?m)^CC\s*=.*\$\(CROSS_COMPILE\)(\S+)\s*$", text)
    return f"{CROSS}{match.group(1) if match else 'gcc'}"


def fetch_kernel_headers(kernel: DebianKernel, cache_dir: Path | None = None, *, timeout: float = 600.0) -> Path:
    """Return the ``KDIR`` (unpacked ``/usr/src/linux-headers-<abi>-<flavour>``) for ``kernel``."""
    packages = HeaderPackages.for_kernel(kernel)
    cache = cache_dir if cache_dir is not None else cache_root() / "linux-headers"
    entry = cache / f"{packages.release}_{packages.version.replace(':', '%3a')}"
    kdir = entry / "usr" / "src" / f"linux-headers-{packages.release}"
    with locked(cache):
        if (entry / ".complete").exists():
            return kdir
        work = Path(tempfile.mkdtemp(dir=cache, prefix=".fetch-"))
        try:
            debs, root = work / "debs", work / "root"
            debs.mkdir()
            # apt-get download writes into its working directory.
            _run(["apt-get", "download", "-q", *packages.specs()], "downloading the kernel headers", cwd=debs)
            found = sorted(debs.glob("*.deb"))
            if len(found) != 3:
                raise LinuxGuestBuildError(f"apt-get download wrote {len(found)} .deb files, expected 3: {found}")
            for deb in found:
                _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}", timeout=timeout)
            # The arm64 Makefile says "include /usr/src/linux-headers-<abi>-common/Makefile": point it
            # at the common tree beside it, by the path it will have once renamed into the cache.
            makefile = root / kdir.relative_to(entry) / "Makefile"
            text = makefile.read_text()
            relocated = text.replace("include /usr/src/", f"include {entry}/usr/src/")
            if relocated == text:
                raise LinuxGuestBuildError(f"{makefile} does not include the common headers as expected:\n{text}")
            makefile.write_text(relocated)
            (root / ".complete").write_text(" ".join(packages.specs()) + "\n")
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(root, entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return kdir


# ---- module, init, initramfs ------------------------------------------------------------------


def _digest(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


def _publish(built: Path, final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.{os.getpid()}")
    shutil.copyfile(built, tmp)
    os.replace(tmp, final)
    return final


def build_module(kdir: Path, outdir: Path) -> Path:
    """Build ``sdei_test.ko`` against ``kdir`` (cached by sources, headers and compiler)."""
    sources = [(name, (MODULE_DIR / name).read_bytes()) for name in MODULE_SOURCES]
    compiler = kbuild_compiler(kdir)
    if shutil.which(compiler) is None:
        raise LinuxGuestUnavailable(
            f"{kdir.name} is built with {compiler} (Debian: {compiler.removeprefix(CROSS)}-aarch64-linux-gnu)"
        )
    # 6.12's headers ship a vmlinux for BTF, and then kbuild runs pahole on the module (6.1's
    # have none and skip that step).
    config = (kdir / ".config").read_text() if (kdir / ".config").exists() else ""
    writes_btf = "\nCONFIG_DEBUG_INFO_BTF_MODULES=y" in config and (kdir / "vmlinux").exists()
    if writes_btf and shutil.which("pahole") is None:
        raise LinuxGuestUnavailable(f"{kdir.name} writes BTF into modules with pahole (Debian: pahole)")
    key = _digest(str(kdir), (kdir.parents[2] / ".complete").read_bytes(), _gcc_version(compiler),
                  *(name + "\0" for name, _ in sources), *(data for _, data in sources))  # fmt: skip
    ko = outdir / f"sdei_test-{key}.ko"
    if ko.exists():
        return ko
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdei-test-module-") as scratch:
        for name, data in sources:
            Path(scratch, name).write_bytes(data)
        _run(
            ["make", "-C", str(kdir), f"M={scratch}", f"ARCH={_ARCH}", f"CROSS_COMPILE={CROSS}", "modules"],
            "building sdei_test.ko",
        )
        return _publish(Path(scratch, "sdei_test.ko"), ko)


def build_init(outdir: Path) -> Path:
    """Build ``/init`` as a static aarch64 binary (cached by source, flags and compiler)."""
    source = (MODULE_DIR / INIT_SOURCE).read_bytes()
    init = outdir / f"init-{_digest(source, ' '.join(INIT_CFLAGS), _gcc_version())}"
    if init.exists():
        return init
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdei-test-init-") as scratch:
        built = Path(scratch, "init")
        _run([f"{CROSS}gcc", *INIT_CFLAGS, "-o", str(built), str(MODULE_DIR / INIT_SOURCE)], "building /init")
        return _publish(built, init)


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: list[CpioEntry]) -> bytes:
    """An uncompressed ``newc`` (SVR4, no CRC) archive, as the kernel's initramfs unpacker reads."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        is_trailer = entry.name == "TRAILER!!!"
        fields = [
            0 if is_trailer else ino, entry.mode, 0, 0,  # ino, mode, uid, gid
            2 if stat.S_ISDIR(entry.mode) else 1 if not is_trailer else 0,  # nlink
            0, len(entry.data), 0, 0,  # mtime, filesize, devmajor, devminor
            entry.rdev[0], entry.rdev[1], len(name), 0,  # rdevmajor, rdevminor, namesize, check
        ]  # fmt: skip
        out.extend(b"070701" + b"".join(f"{value:08x}".encode() for value in fields))
        out.extend(name)
        pad()
        out.extend(entry.data)
        pad()
    return bytes(out)


def write_initramfs(init: Path, module: Path, params: str, outdir: Path) -> Path:
    """The initramfs: /init, /sdei_test.ko, /sdei_test.params and the two device nodes it uses."""
    entries = [
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/kmsg", stat.S_IFCHR | 0o644, rdev=(1, 11)),
        CpioEntry("init", stat.S_IFREG | 0o755, init.read_bytes()),
        CpioEntry("sdei_test.ko", stat.S_IFREG | 0o644, module.read_bytes()),
        CpioEntry("sdei_test.params", stat.S_IFREG | 0o644, params.encode() + b"\n"),
    ]
    archive = cpio_newc(entries)
    path = outdir / f"initramfs-{_digest(archive)}.cpio"
    if not path.exists():
        outdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(archive)
        os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class LinuxEventGuest:
    """Everything one boot needs."""

    kernel: DebianKernel
    initrd: Path
    event: int
    params: str


def prepare_linux_event_guest(event: int = EVENT, cache_dir: Path | None = None) -> LinuxEventGuest:
    """Fetch the kernel and its headers, build the module and /init, write the initramfs (all cached).

    :raise LinuxGuestUnavailable: a host tool is missing (callers skip).
    :raise LinuxGuestBuildError: a build step failed.
    """
    check_tools()
    kernel = fetch_debian_kernel_package()
    kallsyms = load_kallsyms(kernel.image)
    wanted = ("sdei_event_register", "sdei_event_enable")
    missing = [name for name in wanted if name not in kallsyms]
    if missing:
        raise LinuxGuestBuildError(f"{kernel.package} {kernel.version}: kallsyms lacks {', '.join(missing)}")
    root = cache_dir if cache_dir is not None else cache_root()
    kdir = fetch_kernel_headers(kernel, root / "linux-headers")
    outdir = root / "linux-event-guest"
    with locked(outdir):
        module = build_module(kdir, outdir)
        init = build_init(outdir)
        params = f"event={event}"  # the module finds the kernel functions itself (KASLR-proof)
        initrd = write_initramfs(init, module, params, outdir)
    return LinuxEventGuest(kernel, initrd, event, params)


# ---- booting and raising events ---------------------------------------------------------------


@dataclass
class EventProbe:
    """Wraps the SDEI owner the conduit drives and timestamps (perf_counter_ns) what the guest does.

    ``hypercall`` and ``deliver`` are recorded; everything passes through to the owner unchanged
    (the sidecar's state file is still written on each commit).
    """

    inner: Any
    entered: list[tuple[int, int]] = field(default_factory=list)  # (vcpu, ns) per handler entry
    calls: list[tuple[int, int, int]] = field(default_factory=list)  # (vcpu, function id, ns)
    completions: list[tuple[int, int, int]] = field(default_factory=list)  # (vcpu, function id, ns)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def hypercall(self, vcpu: int, regs: VcpuRegs) -> Completion:
        arrived = time.perf_counter_ns()
        fid = function_id(regs.x[0])
        outcome = self.inner.hypercall(vcpu, regs)
        self.calls.append((vcpu, fid, arrived))
        if fid in (Function.EVENT_COMPLETE, Function.EVENT_COMPLETE_AND_RESUME):
            self.completions.append((vcpu, fid, time.perf_counter_ns()))
            self._notify()
        return outcome  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # begin_stop, psci_call, commit, end_stop, ...

    def deliver(self, vcpu: int, regs: VcpuRegs) -> bool:
        entered = bool(self.inner.deliver(vcpu, regs))
        if entered:
            self.entered.append((vcpu, time.perf_counter_ns()))
            self._notify()
        return entered

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_completions(self, count: int, timeout: float) -> None:
        async def wait() -> None:
            while len(self.completions) < count:
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


@dataclass
class Delivery:
    """One raised event as the host saw it (ns since the request; None if not observed)."""

    n: int
    vcpu: int
    cpu: int  # as the guest printed it
    line: str
    outcome: RaiseResult
    entered_ns: int | None  # the dispatcher entered the handler (registers written right after)
    raise_returned_ns: int  # raise_event() returned: the owner saw the handler entered
    line_ns: int  # the callback's console line reached the host
    resumed_ns: int  # the handler's COMPLETE / COMPLETE_AND_RESUME was answered
    handler_calls: list[str]  # the SDEI calls the handler made, in order
    handler_call_ns: list[int]  # when each of them reached the sidecar
    conduit_delivery_ns: int | None  # conduit.stats.delivery_ns sample for this request, if any


class LinuxEventVm:
    """A booted Linux guest with ``sdei_test.ko`` ready and the sidecar serving it.

    Use :func:`booted_linux`. :meth:`raise_event` raises the event and waits until the delivery
    line and the handler's completion have both been seen.
    """

    def __init__(self, guest: LinuxEventGuest, vm: QemuProcess, sidecar: Sidecar, probe: EventProbe) -> None:
        self.guest = guest
        self.vm = vm
        self.sidecar = sidecar
        self.probe = probe
        self.raised = 0
        self.boot_to_ready_s = 0.0

    async def raise_event(self, vcpu: int, timeout: float) -> Delivery:
        conduit = self.sidecar.conduit
        owner = self.sidecar.owner
        assert owner is not None
        n = self.raised + 1
        marks = len(self.probe.entered), len(self.probe.calls), len(self.probe.completions)
        samples = len(conduit.stats.delivery_ns)
        line_re = re.compile(DELIVERY_LINE.format(n=n))
        t0 = time.perf_counter_ns()
        result = await owner.raise_event(self.guest.event, vcpu, wait=timeout)
        returned = time.perf_counter_ns()
        if result.result is not RaiseResult.DELIVERED:
            raise AssertionError(f"event {self.guest.event} on vCPU {vcpu} was not delivered: {result}")
        self.raised = n
        match = await self.vm.wait_for_console(line_re, timeout)
        line_at = time.perf_counter_ns()
        await self.probe.wait_completions(marks[2] + 1, timeout)
        entered = self.probe.entered[marks[0] :]
        completion = self.probe.completions[marks[2]]
        delivery = list(conduit.stats.delivery_ns)[samples:] if len(conduit.stats.delivery_ns) > samples else []
        calls = [c for c in self.probe.calls[marks[1] :] if c[0] == vcpu and c[2] <= completion[2]]
        return Delivery(
            n=n,
            vcpu=vcpu,
            cpu=int(match["cpu"]),
            line=match.group(0),
            outcome=result.result,
            entered_ns=entered[0][1] - t0 if entered else None,
            raise_returned_ns=returned - t0,
            line_ns=line_at - t0,
            resumed_ns=completion[2] - t0,
            handler_calls=[_call_name(fid) for _, fid, _ in calls],
            handler_call_ns=[at - t0 for _, _, at in calls],
            conduit_delivery_ns=delivery[0] if delivery else None,
        )

    def heartbeat(self) -> int:
        """The last heartbeat number /init has printed so far (-1 if none)."""
        beats = HEARTBEAT.findall(self.vm.console)
        return int(beats[-1]) if beats else -1

    async def wait_heartbeat_after(self, beat: int, timeout: float) -> None:
        """Wait for /init's next heartbeat after ``beat``: userspace, timers and the console still work."""
        await self.vm.wait_for_console(re.compile(rf"sdei_test_init: alive {beat + 1}\r?\n"), timeout)

    def trouble(self) -> list[str]:
        return [line for line in self.vm.console.splitlines() if TROUBLE.search(line)]


def _call_name(fid: int) -> str:
    try:
        return Function(fid).name
    except ValueError:
        return f"{fid:#x}"


def sidecar_config(
    guest: LinuxEventGuest, vm: QemuProcess, state_dir: Path, timeout: float, *, conduit: str = "symbols"
) -> dict[str, Any]:
    settings: dict[str, Any] = {"enabled": True, "start_vm": True}
    if conduit == "symbols":
        settings["kernel"] = str(guest.kernel.image)
    return {
        "vm": {"name": "linux-events", "state_dir": str(state_dir)},
        "qmp": {"socket": str(vm.sidecar_socket), "mode": "connect", "timeout": timeout},
        "sdei": {"version": "1.1", "events": [{"number": guest.event}]},
        "psci": {"version": "1.1"},
        "conduit": settings,
        "log": {"level": "warning", "format": "text"},
    }


def _print_failure_facts(vm: QemuProcess, sidecar: Sidecar | None, probe: EventProbe | None) -> None:
    """What a failed Linux event test needs said: every line about SDEI or a kernel fault (a wrong
    delivery count or an oops shows there, not in the tail), the console's tail, the conduit's
    counters and the last SDEI calls the guest made."""
    lines = vm.console.splitlines()
    telling = re.compile(r"sdei|Oops|BUG|WARNING|Internal error|Call trace|panic", re.IGNORECASE)
    said = [line for line in lines if telling.search(line) and "sdei_test_init: alive" not in line]
    print("---- SDEI and fault lines ----\n" + "\n".join(said))
    print("---- console tail ----\n" + "\n".join(lines[-40:]))
    conduit = sidecar.conduit if sidecar is not None else None
    if conduit is not None:
        counters = {k: v for k, v in vars(conduit.stats).items() if isinstance(v, int)}
        print(f"---- conduit counters ----\n{counters}")
    if probe is not None:
        calls = [f"vCPU {vcpu} {_call_name(fid)} {at}" for vcpu, fid, at in probe.calls[-16:]]
        print("---- last SDEI calls (ns) ----\n" + "\n".join(calls))
        print(f"entered {[at for _, at in probe.entered[-8:]]}, completions {len(probe.completions)}")


@contextlib.asynccontextmanager
async def booted_linux(
    guest: LinuxEventGuest,
    workdir: Path,
    *,
    smp: int,
    timeout: float,
    conduit: str = "symbols",
    cpu: str = CPU,
    firmware: str = "direct",
) -> AsyncIterator[LinuxEventVm]:
    """Boot the kernel with the initramfs and the sidecar; yield once ``sdei_test: ready`` is printed.

    ``conduit="symbols"`` boots ``-kernel`` with ``nokaslr nohlt`` and traps the kernel's call sites;
    ``"el2"`` boots through the EL2 stub with the kernel's defaults (KASLR, WFI idle), directly or
    (``firmware="uefi"``) through UEFI from a disk image holding the kernel and the initramfs.
    On exit the sidecar is asked to stop (it detaches; its exit code must be OK) and QEMU is stopped.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if conduit == "el2":
        spec = await qemu_spec(
            workdir, guest.kernel.image, initrd=guest.initrd, cmdline=EL2_APPEND, smp=smp, cpu=cpu,
            conduit="el2", psci_version=(1, 1), firmware=firmware,
        )  # fmt: skip
        spec.name = "linux-events"
    else:
        spec = QemuSpec(
            smp=smp, memory_mb=MEMORY_MB, cpu=cpu, kernel=guest.kernel.image, append=APPEND, paused=True,
            name="linux-events", extra_args=["-initrd", str(guest.initrd)],
        )  # fmt: skip
        # The DTB dump runs QEMU without a kernel, where -initrd is refused: leave it out there.
        spec.dtb = await build_sdei_dtb(
            dataclasses.replace(spec, extra_args=()), workdir / "sdei.dtb", sdei_method="hvc",
            psci_compatible=psci_compatible_for("1.1"),
        )  # fmt: skip
    vm = QemuProcess(spec, workdir / "vm")
    sidecar_task: asyncio.Task[ExitCode] | None = None
    sidecar: Sidecar | None = None
    probe: EventProbe | None = None
    code: ExitCode | BaseException | None = None
    failed = False
    try:
        await asyncio.wait_for(vm.start(), timeout)
        started = time.perf_counter()
        sidecar = Sidecar(parse(sidecar_config(guest, vm, workdir / "state", timeout, conduit=conduit)))
        sidecar_task = asyncio.create_task(sidecar.run(), name="linux-events.sidecar")
        await until(sidecar.conduit_ready.wait(), sidecar_task, timeout, "the conduit")
        # The conduit reads its dispatcher attribute on every call and all calls are synchronous, so
        # swapping it between two awaits is safe; the sidecar's commit hook is unaffected.
        probe = EventProbe(sidecar.conduit.dispatcher)
        sidecar.conduit.dispatcher = probe
        await until(vm.wait_for_console(READY_LINE, timeout), sidecar_task, timeout, "'sdei_test: ready'")
        linux = LinuxEventVm(guest, vm, sidecar, probe)
        linux.boot_to_ready_s = time.perf_counter() - started
        yield linux
    except BaseException:
        failed = True
        try:
            _print_failure_facts(vm, sidecar, probe)
        except Exception as err:  # never in place of the failure itself
            print(f"(the failure's facts could not be printed: {err!r})")
        raise
    finally:
        if sidecar is not None and sidecar_task is not None:
            sidecar.request_shutdown("linux event test finished")
            try:
                code = await asyncio.wait_for(asyncio.shield(sidecar_task), timeout)
            except (TimeoutError, Exception) as err:
                sidecar_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sidecar_task
                code = err
        await vm.stop()
        if not failed and sidecar is not None:
            assert code == ExitCode.OK, f"sidecar exit {code!r}: {sidecar.shutdown_reason}"
