"""A guest reset under the full sidecar: the conduit still traps afterwards and SDEI state starts fresh.

The guest (built here from the sources below, with the bare-metal guest's toolchain and flags)
counts its boots in RAM outside its image (RAM survives a reset; the -kernel loader only rewrites
the image). Every boot it calls SDEI_VERSION and SDEI_EVENT_STATUS(1000) through its one trapped
``hvc``. On the first boot it also registers and enables event 1000 and then asks for PSCI
SYSTEM_RESET through the same ``hvc``; the sidecar passes that through to QEMU, which resets the VM
(``-action reboot=reset``: QemuSpec passes ``-no-reboot``).

After the reset the guest must get the dispatcher's answers again: SDEI 1.1 rather than QEMU's
NOT_SUPPORTED (-1), which would mean the breakpoint was lost, and status 0 for event 1000, which
means the sidecar reset SDEI state before the guest's first call. That is the daemon's
QMP RESET -> ``dispatcher.reset()`` + ``conduit.rearm()`` path, driven by :class:`Sidecar` built
from a config, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qmp_sdei.config import parse
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from support.guests import build_guest_dir, cached_build_dir
from support.sidecar import until

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.asyncio]

TIMEOUT = 60.0  # per wait: TCG on a busy 2-core host, other QEMUs running beside us
RESET_ACTION = ("-action", "reboot=reset")
SDEI_1_1 = 0x0001_0001_0000_0000
NOT_SUPPORTED = 0xFFFF_FFFF_FFFF_FFFF
BOOT_COUNTER = 0x4800_0000  # 128 MiB into RAM: far from the image, the DTB and the stack

START_S = """
    .section .text.boot, "ax"
    .global _start
_start:
    ldr     x0, =__stack_top
    mov     sp, x0
    bl      main
1:  wfe
    b       1b

    .text
    .global sdei_call
sdei_call:                      /* the only hvc in the image: the one trap site */
    hvc     #0
    ret
"""

LINK_LD = """
ENTRY(_start)
SECTIONS
{
    . = 0x40080000;
    .text : { KEEP(*(.text.boot)) *(.text .text.*) }
    .rodata : { *(.rodata .rodata.*) }
    .data : { *(.data .data.*) }
    .bss : { *(.bss .bss.*) *(COMMON) }
    . = ALIGN(4096);
    . += 0x4000;
    __stack_top = .;
    /DISCARD/ : { *(.comment) *(.note*) *(.eh_frame*) }
}
"""

GUEST_C = f"""
#include <stdint.h>

#define BOOT_COUNTER ((volatile uint64_t *){BOOT_COUNTER:#x}UL)
#define UART_DR ((volatile uint32_t *)0x09000000UL)
#define UART_FR ((volatile uint32_t *)0x09000018UL)
#define SDEI_VERSION 0xC4000020UL
#define SDEI_EVENT_REGISTER 0xC4000021UL
#define SDEI_EVENT_ENABLE 0xC4000022UL
#define SDEI_EVENT_STATUS 0xC4000028UL
#define SDEI_PE_UNMASK 0xC400002CUL
#define PSCI_SYSTEM_RESET 0x84000009UL

extern uint64_t sdei_call(uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5);

static void putc_(char c)
{{
    while (*UART_FR & (1u << 5)) {{
    }}
    *UART_DR = (uint32_t)c;
}}

static void put(const char *s)
{{
    while (*s)
        putc_(*s++);
}}

static void kv(const char *key, uint64_t v)
{{
    putc_(' ');
    put(key);
    putc_('=');
    put("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        putc_("0123456789abcdef"[(v >> shift) & 0xf]);
}}

static uint64_t call1(uint64_t fid, uint64_t a1) {{ return sdei_call(fid, a1, 0, 0, 0, 0); }}

void main(void)
{{
    uint64_t boot = *BOOT_COUNTER + 1;
    *BOOT_COUNTER = boot;
    put("BOOT");
    kv("n", boot);
    kv("version", call1(SDEI_VERSION, 0));
    kv("status", call1(SDEI_EVENT_STATUS, 1000));
    put("\\r\\n");
    if (boot == 1) {{
        put("SETUP");
        kv("register", sdei_call(SDEI_EVENT_REGISTER, 1000, (uint64_t)main, 7, 0, 0));
        kv("enable", call1(SDEI_EVENT_ENABLE, 1000));
        kv("unmask", call1(SDEI_PE_UNMASK, 0));
        kv("status", call1(SDEI_EVENT_STATUS, 1000));
        put("\\r\\nRESET\\r\\n");
        uint64_t r = call1(PSCI_SYSTEM_RESET, 0);
        put("FATAL reset returned");
        kv("x0", r);
        put("\\r\\n");
        return;
    }}
    put("DONE");
    kv("n", boot);
    put("\\r\\n");
}}
"""

LINE = r"{kind}((?: \w+=0x[0-9a-f]+)*)\r?\n"


def build_reset_guest(src: Path, outdir: Path) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    (src / "start.S").write_text(START_S)
    (src / "guest.c").write_text(GUEST_C)
    (src / "link.ld").write_text(LINK_LD)
    return build_guest_dir(src, outdir)


@pytest.fixture(scope="session")
def reset_elf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = cached_build_dir(request, tmp_path_factory, "reset-guest")
    return build_reset_guest(tmp_path_factory.mktemp("reset-guest-src"), outdir)


def config_doc(vm: QemuProcess, state_dir: Path, elf: Path) -> dict[str, Any]:
    return {
        "vm": {"name": "conduit-reset-test", "state_dir": str(state_dir)},
        "qmp": {"socket": str(vm.sidecar_socket), "mode": "connect", "timeout": TIMEOUT},
        "sdei": {"version": "1.1", "profile": "tf-a", "events": [{"number": 1000}]},
        "conduit": {"enabled": True, "elf": str(elf), "start_vm": True},
        "log": {"level": "info", "format": "text"},
    }


@contextlib.asynccontextmanager
async def running_sidecar(sidecar: Sidecar) -> AsyncIterator[asyncio.Task[ExitCode]]:
    task = asyncio.create_task(sidecar.run(), name="test.sidecar")
    try:
        await until(sidecar.conduit_ready.wait(), task, TIMEOUT, "the conduit to attach")
        yield task
    finally:
        if not task.done():
            sidecar.request_shutdown("test finished")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, TIMEOUT)


async def line(vm: QemuProcess, kind: str) -> dict[str, int]:
    """The first ``kind`` line on the console, once there is one, as key -> value."""
    match = await vm.wait_for_console(LINE.format(kind=kind), TIMEOUT)
    return {k: int(v, 16) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+)", match.group(1))}


async def test_guest_reset_rearms_the_conduit_and_resets_sdei_state(
    tmp_path: Path, reset_elf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    vm = QemuProcess(QemuSpec(kernel=reset_elf, extra_args=RESET_ACTION, name="conduit-reset-test"), tmp_path / "vm")
    try:
        await asyncio.wait_for(vm.start(), TIMEOUT)  # -S: the sidecar starts it once the trap is armed
        sidecar = Sidecar(parse(config_doc(vm, tmp_path / "state", reset_elf)))
        async with running_sidecar(sidecar) as task:
            first = await line(vm, "BOOT")
            assert first == {"n": 1, "version": SDEI_1_1, "status": 0}, vm.console
            setup = await line(vm, "SETUP")
            assert setup == {"register": 0, "enable": 0, "unmask": 0, "status": 3}, vm.console
            await vm.wait_for_console(r"RESET\r?\n", TIMEOUT)

            await sidecar.wait_until(lambda: sidecar.owner.counters.guest_resets == 1, TIMEOUT)
            second = await line(vm, "DONE")
            assert second == {"n": 2}, vm.console
            boots = [
                {k: int(v, 16) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+)", m.group(1))}
                for m in re.finditer(LINE.format(kind="BOOT"), vm.console)
            ]
            assert len(boots) == 2, vm.console
            # The dispatcher's answer, not QEMU's NOT_SUPPORTED: the trap is armed after the reset...
            assert boots[1]["version"] != NOT_SUPPORTED, "the hvc was not trapped after the reset"
            # ...and the registration from before the reset is gone.
            assert boots[1] == {"n": 2, "version": SDEI_1_1, "status": 0}, vm.console
            assert "FATAL" not in vm.console, vm.console

            assert sidecar.owner.counters.guest_resets == 1
            assert sidecar.owner.counters.resets == 1
            assert sidecar.dispatcher is not None
            assert sidecar.dispatcher.describe()["vcpus"][0]["masked"]
            stats = sidecar.conduit.stats
            assert stats.sdei_calls == 8  # boot 1: 2 + 4, boot 2: 2
            assert stats.psci_passthrough == 1  # the SYSTEM_RESET
            assert not task.done()
        # The re-arm ran in the background: it must not have failed (the sidecar only logs that).
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, errors
    finally:
        await vm.stop()
