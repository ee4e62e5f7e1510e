"""The SDEI DTB built from QEMU's own tree: real ``qemu-system-aarch64 dumpdtb`` plus real dtc."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qmp_sdei.errors import ConfigError, QemuError, VersionError
from qmp_sdei.qemu import dtb as dtb_module
from qmp_sdei.qemu.dtb import build_sdei_dtb, decompile_dtb, psci_compatible_for, sdei_overlay
from qmp_sdei.qemu.launch import QemuSpec

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-aarch64") is None or shutil.which("dtc") is None,
    reason="needs qemu-system-aarch64 and dtc",
)

TIMEOUT = 120.0  # TCG machine creation is quick, but the host may be busy with other QEMUs


def _strings(node: str, prop: str) -> list[str]:
    """A string-list property of ``node``, as dtc 1.6 (``"a\\0b"``) or 1.7 (``"a", "b"``) prints it."""
    match = re.search(rf"(?m)^\t*{re.escape(prop)} = (\".*\");$", node)
    assert match is not None, f"no {prop} in:\n{node}"
    return [part for quoted in re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(1)) for part in quoted.split("\\0")]


def _node(dts: str, name: str) -> str:
    """The text of the first node called ``name`` (enough for QEMU's flat, tab-indented output)."""
    match = re.search(rf"(?ms)^(\t*){re.escape(name)} \{{\n(.*?)^\1\}};", dts)
    assert match is not None, f"no {name} node in:\n{dts}"
    return match.group(2)


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_sdei_node_added_and_machine_kept(tmp_path: Path) -> None:
    spec = QemuSpec(smp=2, memory_mb=384)
    out = await build_sdei_dtb(spec, tmp_path / "sdei.dtb", cache_dir=tmp_path / "cache", timeout=TIMEOUT)
    dts = await decompile_dtb(out)
    firmware = _node(dts, "firmware")
    sdei = _node(firmware, "sdei")
    assert 'compatible = "arm,sdei-1.0";' in sdei
    assert 'method = "hvc";' in sdei
    # QEMU's own parts are intact: both CPUs, 384 MiB at 0x40000000, and the untouched PSCI node.
    assert len(re.findall(r"(?m)^\t\tcpu@\d+ \{", dts)) == 2
    assert "reg = <0x00 0x40000000 0x00 0x18000000>;" in _node(dts, "memory@40000000")
    assert _strings(_node(dts, "psci"), "compatible") == ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_psci_pin_smc_method_and_cache(tmp_path: Path) -> None:
    spec = QemuSpec(smp=1, memory_mb=256)
    cache = tmp_path / "cache"
    first = await build_sdei_dtb(
        spec,
        tmp_path / "a.dtb",
        sdei_method="smc",
        psci_compatible=psci_compatible_for("0.2"),
        cache_dir=cache,
        timeout=TIMEOUT,
    )
    dts = await decompile_dtb(first)
    assert 'method = "smc";' in _node(dts, "sdei")
    assert _strings(_node(dts, "psci"), "compatible") == ["arm,psci-0.2", "arm,psci"]
    assert len(list(cache.glob("*.dtb"))) == 1
    # Same inputs: served from the cache byte for byte; different inputs: a new entry.
    again = await build_sdei_dtb(
        spec,
        tmp_path / "b.dtb",
        sdei_method="smc",
        psci_compatible=psci_compatible_for("0.2"),
        cache_dir=cache,
        timeout=TIMEOUT,
    )
    assert again.read_bytes() == first.read_bytes()
    await build_sdei_dtb(spec, tmp_path / "c.dtb", cache_dir=cache, timeout=TIMEOUT)
    assert len(list(cache.glob("*.dtb"))) == 2


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_pinning_psci_without_psci_node_is_refused(tmp_path: Path) -> None:
    """``-M virt,secure=on`` gives a tree without /psci; pinning PSCI there is refused clearly."""
    spec = QemuSpec(machine_options={"secure": "on"})
    with pytest.raises(QemuError, match="no /psci node"):
        await build_sdei_dtb(spec, tmp_path / "x.dtb", psci_compatible=("arm,psci-0.2",), use_cache=False)


def test_overlay_merges_into_existing_firmware_node(tmp_path: Path) -> None:
    """dtc merges the appended block by path, so other /firmware children survive (QEMU virt has none)."""
    source = tmp_path / "in.dts"
    source.write_text(
        '/dts-v1/;\n/ {\n\tfirmware {\n\t\toptee {\n\t\t\tcompatible = "linaro,optee-tz";\n'
        '\t\t\tmethod = "smc";\n\t\t};\n\t};\n\tpsci {\n\t\tcompatible = "arm,psci-1.0";\n\t};\n};\n'
        + sdei_overlay("hvc", ("arm,psci-0.2", "arm,psci"))
    )
    compiled = tmp_path / "out.dtb"
    subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", str(compiled), str(source)], check=True)
    dts = subprocess.run(
        ["dtc", "-q", "-I", "dtb", "-O", "dts", str(compiled)], check=True, capture_output=True, text=True
    ).stdout
    firmware = _node(dts, "firmware")
    assert 'compatible = "linaro,optee-tz";' in _node(firmware, "optee")
    assert 'compatible = "arm,sdei-1.0";' in _node(firmware, "sdei")
    assert dts.count("firmware {") == 1
    assert _strings(_node(dts, "psci"), "compatible") == ["arm,psci-0.2", "arm,psci"]


@pytest.mark.asyncio
async def test_bad_inputs_and_missing_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="sdei method"):
        await build_sdei_dtb(QemuSpec(), tmp_path / "x.dtb", sdei_method="svc")
    with pytest.raises(ConfigError, match="invalid device-tree string"):
        sdei_overlay("hvc", ['bad"quote'])
    monkeypatch.setattr(dtb_module, "QEMU_BINARY", "qemu-system-nonexistent")
    with pytest.raises(QemuError, match="not found on PATH"):
        await build_sdei_dtb(QemuSpec(), tmp_path / "x.dtb", use_cache=False)
    monkeypatch.setattr(dtb_module, "DTC", "dtc-nonexistent")
    with pytest.raises(dtb_module.DtbError, match="device-tree-compiler"):
        await decompile_dtb(tmp_path / "x.dtb")


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_qemu_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="could not dump its DTB"):
        await build_sdei_dtb(QemuSpec(cpu="no-such-cpu"), tmp_path / "x.dtb", use_cache=False, timeout=TIMEOUT)


def test_psci_compatible_strings() -> None:
    assert psci_compatible_for((0, 1)) == ("arm,psci",)
    assert psci_compatible_for("0.2") == ("arm,psci-0.2", "arm,psci")
    assert psci_compatible_for("1.0") == ("arm,psci-1.0", "arm,psci-0.2", "arm,psci")
    assert psci_compatible_for((1, 1)) == ("arm,psci-1.0", "arm,psci-0.2", "arm,psci")
    for bad in ("2.0", "one", (0, 3)):
        with pytest.raises(VersionError):
            psci_compatible_for(bad)
