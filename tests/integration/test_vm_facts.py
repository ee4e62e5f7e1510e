"""VM discovery against a real QEMU: topology, MPIDRs, identity, PSCI conduit, and refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from uuid import UUID

import pytest

from qmp_sdei.errors import QemuError
from qmp_sdei.qemu.facts import PsciConduit, QemuVersion, VmFacts, discover, qemu_psci_version
from qmp_sdei.qemu.launch import QemuSpec
from qmp_sdei.qemu.qmp import attach
from support.qemu import SLOW, harness_client, qemu_release, requires_qemu, running_qemu

pytestmark = [pytest.mark.qemu, requires_qemu]


async def facts_of(tmp_path: Path, spec: QemuSpec) -> VmFacts:
    async with (
        running_qemu(tmp_path, spec) as vm,
        await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s,
    ):
        return await discover(s)


def gic_mpidr(index: int, cluster: int) -> int:
    """-M virt puts `cluster` vCPUs per Aff1 cluster: 8 with GICv2, 16 with GICv3."""
    return (index // cluster) << 8 | index % cluster


@pytest.mark.asyncio
@pytest.mark.parametrize("smp", [1, 2, 8])
async def test_topology_and_mpidrs(tmp_path: Path, smp: int) -> None:
    facts = await facts_of(tmp_path, QemuSpec(smp=smp))
    assert [v.index for v in facts.vcpus] == list(range(smp))
    assert [v.mpidr for v in facts.vcpus] == [gic_mpidr(i, 8) for i in range(smp)]
    assert len({v.qom_path for v in facts.vcpus}) == smp
    assert all(v.thread_id is not None and v.thread_id > 0 for v in facts.vcpus)
    assert facts.target == "aarch64"
    assert facts.machine_type.startswith("virt")
    assert facts.gic_version == "2"
    assert facts.runstate == "prelaunch"
    assert facts.vcpu_by_mpidr(facts.vcpus[-1].mpidr) is facts.vcpus[-1]
    assert facts.vcpu_by_mpidr(0xFFFF) is None


@pytest.mark.asyncio
async def test_64_vcpus_with_gicv3(tmp_path: Path) -> None:
    facts = await facts_of(tmp_path, QemuSpec(smp=64, machine_options={"gic-version": "3"}))
    assert len(facts.vcpus) == 64
    assert [v.mpidr for v in facts.vcpus] == [gic_mpidr(i, 16) for i in range(64)]
    assert facts.vcpus[16].mpidr == 0x100
    assert facts.gic_version == "3"


@pytest.mark.asyncio
async def test_name_and_uuid(tmp_path: Path) -> None:
    uuid = "6f1c2a5e-0b7d-4c52-9a6e-3d2f1b0c9e8a"
    facts = await facts_of(tmp_path, QemuSpec(name="guest-under-test", uuid=uuid))
    assert facts.name == "guest-under-test"
    assert facts.uuid == UUID(uuid)


@pytest.mark.asyncio
async def test_name_and_uuid_absent(tmp_path: Path) -> None:
    facts = await facts_of(tmp_path, QemuSpec())
    assert facts.name is None
    assert facts.uuid is None


@pytest.mark.asyncio
async def test_default_virt_uses_hvc(tmp_path: Path) -> None:
    facts = await facts_of(tmp_path, QemuSpec(memory_mb=384))
    assert facts.memory_mb == 384  # where a firmware-booted EL2 stub sits (the top of RAM)
    assert facts.psci_conduit is PsciConduit.HVC
    assert not facts.virtualization
    assert not facts.secure


@pytest.mark.asyncio
async def test_virtualization_on_uses_smc(tmp_path: Path) -> None:
    facts = await facts_of(tmp_path, QemuSpec(machine_options={"virtualization": "on"}))
    assert facts.psci_conduit is PsciConduit.SMC
    assert facts.virtualization


@pytest.mark.asyncio
async def test_qemu_version_and_psci_version(tmp_path: Path) -> None:
    facts = await facts_of(tmp_path, QemuSpec())
    assert facts.qemu_version >= QemuVersion(7, 0, 0)
    if (facts.qemu_version.major, facts.qemu_version.minor) == (7, 2):
        assert qemu_psci_version(facts) == (1, 1)  # verified by guest code on 7.2 and 10.0
    between = dataclasses.replace(facts, qemu_version=QemuVersion(9, 1, 0))
    newer = dataclasses.replace(facts, qemu_version=QemuVersion(11, 0, 0))
    older = dataclasses.replace(facts, qemu_version=QemuVersion(6, 2, 0))
    assert qemu_psci_version(between) == (1, 1)
    assert qemu_psci_version(newer) == (1, 1)
    assert qemu_psci_version(older) == (0, 2)


@pytest.mark.asyncio
async def test_psci_disabled_is_refused(tmp_path: Path) -> None:
    # secure=on without EL3 firmware: QEMU 7.2 leaves psci-conduit at 0.
    with pytest.raises(QemuError, match="PSCI emulation is disabled") as info:
        await facts_of(tmp_path, QemuSpec(machine_options={"secure": "on"}))
    assert "\n" not in str(info.value)


@pytest.mark.asyncio
async def test_vcpus_disagreeing_on_conduit_are_refused(tmp_path: Path) -> None:
    async with (
        running_qemu(tmp_path, QemuSpec(smp=2)) as vm,
        await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s,
        harness_client(vm) as host,
    ):
        cpus = await host.execute("query-cpus-fast")
        assert isinstance(cpus, list)
        # QEMU (7.2 and 10) accepts this on a realized CPU, which is how a test gets vCPUs that disagree.
        await host.execute("qom-set", {"path": cpus[1]["qom-path"], "property": "psci-conduit", "value": 1})
        with pytest.raises(QemuError, match="disagree on psci-conduit"):
            await discover(s)


@pytest.mark.asyncio
async def test_non_virt_machine_is_refused(tmp_path: Path) -> None:
    # It starts without firmware under -S. It has a sound device: QEMU 10 exits at start without an
    # audio backend for it ("-audio none" gives one; an "-audiodev" alone does not), where 7.2
    # only warned and rejects "-audio none" (it wants a model). Verified on 7.2 and 10; 8.2 is
    # where "-audio" began to take a bare backend.
    audio = ("-audio", "none") if qemu_release() >= (8, 2) else ()
    spec = QemuSpec(machine="xlnx-zcu102", cpu="cortex-a53", extra_args=audio)
    with pytest.raises(QemuError, match="not 'virt'") as info:
        await facts_of(tmp_path, spec)
    assert "xlnx-zcu102" in str(info.value)
