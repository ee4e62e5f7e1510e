"""Learn, once at attach, what kind of VM the sidecar serves, and refuse the ones it cannot.

:func:`discover` asks QEMU (over an attached :class:`~qmp_sdei.qemu.qmp.QmpSession`) for its
version, target, machine, vCPU topology with each vCPU's MPIDR affinity, PSCI conduit, name,
UUID and runstate, and returns them as one frozen :class:`VmFacts`. The dispatcher's topology
and the conduit's choice of trap instruction come from here, so a VM we cannot serve (not
aarch64, not ``-M virt``, QEMU's PSCI disabled) is rejected here with a one-line
:class:`~qmp_sdei.errors.QemuError` rather than misbehaving later.

:func:`qemu_psci_version` says which PSCI version QEMU's own emulation answers the guest.

It must not change the VM: every command it sends is a query.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from uuid import UUID

from qmp_sdei.errors import QemuError
from qmp_sdei.qemu.qmp import QmpSession

__all__ = [
    "PsciConduit",
    "QemuVersion",
    "VcpuFacts",
    "VmFacts",
    "discover",
    "qemu_psci_version",
]

_NIL_UUID: Final = UUID(int=0)


class PsciConduit(enum.IntEnum):
    """QEMU's ``psci-conduit`` CPU property: which instruction its PSCI emulation answers."""

    DISABLED = 0  # QEMU does not emulate PSCI (e.g. -M virt,secure=on with EL3 firmware)
    SMC = 1  # -M virt,virtualization=on: the guest runs at EL2, PSCI is reached with smc
    HVC = 2  # plain -M virt: PSCI is reached with hvc


@dataclass(frozen=True, slots=True, order=True)
class QemuVersion:
    """QEMU's version as ``query-version`` reports it; compares by (major, minor, micro)."""

    major: int
    minor: int
    micro: int
    package: str = ""

    def __str__(self) -> str:
        suffix = f" ({self.package})" if self.package else ""
        return f"{self.major}.{self.minor}.{self.micro}{suffix}"


@dataclass(frozen=True, slots=True)
class VcpuFacts:
    """One vCPU.

    ``mpidr`` holds the affinity fields of MPIDR_EL1 (Aff3 in bits 39:32, Aff2..Aff0 in 23:0)
    as QEMU's ``mp-affinity`` property reports them: what the guest's MPIDR_EL1 shows with the
    RES1 bit 31 and the U/MT bits masked off, and what SDEI routing and PSCI ``CPU_ON`` use.
    """

    index: int
    qom_path: str
    thread_id: int | None
    mpidr: int


@dataclass(frozen=True, slots=True)
class VmFacts:
    """Everything the sidecar needs to know about its VM, learnt once at attach."""

    qemu_version: QemuVersion
    target: str
    machine_type: str  # QOM type, e.g. "virt-7.2-machine"
    virtualization: bool  # guest starts at EL2 (-M virt,virtualization=on)
    secure: bool  # EL3 present (-M virt,secure=on)
    gic_version: str  # "2", "3", "4" as /machine reports it after init
    vcpus: tuple[VcpuFacts, ...]  # ordered by index
    psci_conduit: PsciConduit
    name: str | None  # -name, None if unset
    uuid: UUID | None  # -uuid, None if unset (QEMU reports the nil UUID)
    runstate: str  # query-status at discovery time
    memory_mb: int = 0  # boot RAM (query-memory-size-summary), 0 if unknown: where a firmware-booted stub sits

    def vcpu_by_mpidr(self, mpidr: int) -> VcpuFacts | None:
        """The vCPU with this MPIDR affinity, or ``None``."""
        for vcpu in self.vcpus:
            if vcpu.mpidr == mpidr:
                return vcpu
        return None


# -- reply checking -----------------------------------------------------------------------------


def _mapping(reply: object, command: str) -> Mapping[str, object]:
    if not isinstance(reply, Mapping):
        raise QemuError(f"QMP {command} returned {reply!r}, expected an object")
    return reply


def _field(reply: Mapping[str, object], key: str, kind: type, command: str) -> object:
    value = reply.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QemuError(f"QMP {command} returned {key}={value!r}, expected {kind.__name__}")
    return value


def _as_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise QemuError(f"{what} is {value!r}, expected an integer")
    return value


def _as_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise QemuError(f"{what} is {value!r}, expected a boolean")
    return value


async def _qom_get(session: QmpSession, path: str, prop: str) -> object:
    return await session.execute("qom-get", {"path": path, "property": prop})


# -- discovery ----------------------------------------------------------------------------------


def _parse_version(reply: object) -> QemuVersion:
    version = _mapping(reply, "query-version")
    qemu = _mapping(version.get("qemu"), "query-version qemu")
    package = version.get("package")
    return QemuVersion(
        major=_as_int(qemu.get("major"), "QEMU major version"),
        minor=_as_int(qemu.get("minor"), "QEMU minor version"),
        micro=_as_int(qemu.get("micro"), "QEMU micro version"),
        package=package.strip() if isinstance(package, str) else "",
    )


def _parse_cpus(reply: object) -> list[tuple[int, str, int | None]]:
    if not isinstance(reply, Sequence) or isinstance(reply, str) or not reply:
        raise QemuError(f"QMP query-cpus-fast returned {reply!r}, expected a non-empty list")
    cpus = []
    for item in reply:
        cpu = _mapping(item, "query-cpus-fast")
        index = _as_int(cpu.get("cpu-index"), "query-cpus-fast cpu-index")
        path = _field(cpu, "qom-path", str, "query-cpus-fast")
        thread = cpu.get("thread-id")
        cpus.append((index, str(path), thread if isinstance(thread, int) else None))
    cpus.sort()
    return cpus


def _parse_uuid(reply: object) -> UUID | None:
    text = _field(_mapping(reply, "query-uuid"), "UUID", str, "query-uuid")
    try:
        value = UUID(str(text))
    except ValueError as err:
        raise QemuError(f"QMP query-uuid returned an invalid UUID {text!r}") from err
    return None if value == _NIL_UUID else value


def _check_machine(machine_type: str) -> None:
    # QOM names machine classes "<alias>-machine"; the virt family is "virt" or "virt-X.Y".
    base = machine_type.removesuffix("-machine")
    if base != "virt" and not base.startswith("virt-"):
        raise QemuError(f"VM runs machine {base!r}, not 'virt': the sidecar relies on -M virt's PSCI and layout")


async def discover(session: QmpSession) -> VmFacts:
    """Ask QEMU what VM this is, and check the sidecar can serve it.

    Queries are pipelined: the fixed ones in one batch, then all per-vCPU ``qom-get`` calls in a
    second (two per vCPU), so attach time stays flat with the vCPU count instead of growing by
    a round trip per vCPU.

    :raise QemuError: with a one-line message when the target is not aarch64, the machine is
        not ``virt``, QEMU's PSCI is disabled, the vCPUs disagree on the conduit, or a reply is
        not what QEMU 7.x sends; :class:`~qmp_sdei.qemu.qmp.QmpCommandError` for a refused query.
    """
    version_r, target_r, type_r, cpus_r, name_r, uuid_r, status_r, memory_r = await asyncio.gather(
        session.execute("query-version"),
        session.execute("query-target"),
        _qom_get(session, "/machine", "type"),
        session.execute("query-cpus-fast"),
        session.execute("query-name"),
        session.execute("query-uuid"),
        session.execute("query-status"),
        session.execute("query-memory-size-summary"),
    )
    target = str(_field(_mapping(target_r, "query-target"), "arch", str, "query-target"))
    if target != "aarch64":
        raise QemuError(f"QEMU emulates {target!r}, not aarch64: the sidecar serves aarch64 guests only")
    if not isinstance(type_r, str):
        raise QemuError(f"qom-get /machine type returned {type_r!r}, expected a string")
    _check_machine(type_r)
    cpus = _parse_cpus(cpus_r)

    machine_props = ("virtualization", "secure", "gic-version")
    per_vcpu = [(path, prop) for _, path, _ in cpus for prop in ("mp-affinity", "psci-conduit")]
    replies = await asyncio.gather(
        *(_qom_get(session, "/machine", prop) for prop in machine_props),
        *(_qom_get(session, path, prop) for path, prop in per_vcpu),
    )
    virtualization = _as_bool(replies[0], "/machine virtualization")
    secure = _as_bool(replies[1], "/machine secure")
    gic_version = str(replies[2])
    vcpu_replies = replies[len(machine_props) :]

    vcpus = []
    conduits = set()
    for n, (index, path, thread) in enumerate(cpus):
        mpidr = _as_int(vcpu_replies[2 * n], f"{path} mp-affinity")
        conduit = _as_int(vcpu_replies[2 * n + 1], f"{path} psci-conduit")
        vcpus.append(VcpuFacts(index=index, qom_path=path, thread_id=thread, mpidr=mpidr))
        conduits.add(conduit)
    if len(conduits) != 1:
        raise QemuError(f"vCPUs disagree on psci-conduit ({sorted(conduits)}); the sidecar needs one")
    raw_conduit = conduits.pop()
    try:
        conduit = PsciConduit(raw_conduit)
    except ValueError as err:
        raise QemuError(f"unknown psci-conduit value {raw_conduit}") from err
    if conduit is PsciConduit.DISABLED:
        raise QemuError(
            "QEMU's PSCI emulation is disabled (psci-conduit=0, e.g. -M virt,secure=on with firmware): "
            "the sidecar needs it"
        )
    if len({v.mpidr for v in vcpus}) != len(vcpus):
        raise QemuError("two vCPUs report the same mp-affinity; cannot route SDEI events by MPIDR")

    name = _mapping(name_r, "query-name").get("name")
    status = _field(_mapping(status_r, "query-status"), "status", str, "query-status")
    return VmFacts(
        qemu_version=_parse_version(version_r),
        target=target,
        machine_type=type_r,
        virtualization=virtualization,
        secure=secure,
        gic_version=gic_version,
        vcpus=tuple(vcpus),
        psci_conduit=conduit,
        name=name if isinstance(name, str) else None,
        uuid=_parse_uuid(uuid_r),
        runstate=str(status),
        memory_mb=_as_int(_mapping(memory_r, "query-memory-size-summary").get("base-memory"), "base-memory") >> 20,
    )


# -- PSCI version -------------------------------------------------------------------------------

_PSCI_VERSION_VERIFIED: Final[Mapping[tuple[int, int], tuple[int, int]]] = {
    # QEMU (major, minor) -> PSCI (major, minor) its TCG emulation answers to PSCI_VERSION.
    # 7.2: verified by guest code on Debian's 1:7.2+dfsg-7 (HVC conduit): 0x00010001, although
    # the generated DT's compatible only claims "arm,psci-1.0".
    (7, 2): (1, 1),
    # 10.0: the same, on Debian's 1:10.0.13+ds (docs/qemu-versions.md).
    (10, 0): (1, 1),
}

_PSCI_FLOOR: Final = (0, 2)
"""What any QEMU with a ``psci`` DT node and PSCI 0.2 function ids answers at least."""


def qemu_psci_version(facts: VmFacts) -> tuple[int, int]:
    """The PSCI version QEMU's own PSCI emulation reports to this guest.

    This is a table keyed by QEMU release because QEMU 7.2 exposes no ``psci-version``
    property to read over QMP, and its DT understates the version (says 1.0, answers 1.1), so
    neither source can be trusted. Only verified releases are listed. For others the rule is
    conservative: a release is assumed to answer what the newest verified release before it
    does (QEMU has only ever raised its PSCI level); one older than every verified release is
    assumed to offer only the PSCI 0.2 baseline, so the sidecar never claims functions an old
    QEMU might lack.
    """
    release = (facts.qemu_version.major, facts.qemu_version.minor)
    earlier = [verified for verified in _PSCI_VERSION_VERIFIED if verified <= release]
    if earlier:
        return _PSCI_VERSION_VERIFIED[max(earlier)]
    return _PSCI_FLOOR
