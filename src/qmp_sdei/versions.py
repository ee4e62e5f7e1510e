"""Which SDEI and PSCI versions exist, which one a VM gets, and the rule that it never changes.

A guest that has seen a version must keep it for the VM's life: across guest and host resets, across
sidecar restarts and across live migration ("KVM is very much responsible for upholding ABI of older
specs"). So the first negotiation *pins* the versions, the pins are saved with the dispatcher state,
and every later negotiation starts from the pins: a config that asks for something else gets a
warning and the pins stay; a QEMU that cannot honour the pins is refused before the guest runs.

Pure policy: no I/O. The daemon supplies what QEMU offers and what the state directory or the
migration source pinned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qmp_sdei.abi import psci
from qmp_sdei.abi.sdei import Function as SdeiFunction
from qmp_sdei.abi.smccc import function_id
from qmp_sdei.errors import VersionError

Version = tuple[int, int]

#: SDEI functions per version. Both have every call: TF-A serves SIGNAL and FEATURES while
#: reporting 1.0, and Linux never probes; only FEATURES(RELATIVE_MODE) differs (a dispatcher detail).
SDEI_FUNCTIONS: dict[Version, frozenset[int]] = {
    (1, 0): frozenset(SdeiFunction),
    (1, 1): frozenset(SdeiFunction),
}
SDEI_LATEST: Version = max(SDEI_FUNCTIONS)

#: PSCI functions per version (0.2, 1.0, 1.1).
PSCI_FUNCTIONS: dict[Version, frozenset[int]] = dict(psci.FUNCTIONS_BY_VERSION)


_VERSION_TEXT = re.compile(r"([0-9]{1,5})\.([0-9]{1,5})")


def parse_version(text: str, *, known: dict[Version, Any], what: str) -> Version:
    """``"1.1"`` -> ``(1, 1)``, refusing versions not in ``known``."""
    match = _VERSION_TEXT.fullmatch(text)
    if match is None:  # int() alone would also take " 1", "+1", "1_0" and non-ASCII digits
        raise VersionError(f"{what} version {text!r} is not of the form MAJOR.MINOR")
    major, minor = int(match[1]), int(match[2])
    if (major, minor) not in known:
        choices = ", ".join(format_version(v) for v in sorted(known))
        raise VersionError(f"{what} version {text} is not supported (choose {choices})")
    return major, minor


def format_version(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


@dataclass(frozen=True)
class VersionPins:
    """The versions a guest has been shown. Saved with the state; travels with migrations."""

    sdei: Version
    sdei_vendor: int
    psci: Version

    def to_dict(self) -> dict[str, Any]:
        return {
            "sdei": format_version(self.sdei),
            "sdei_vendor": self.sdei_vendor,
            "psci": format_version(self.psci),
        }

    @classmethod
    def from_dict(cls, data: Any) -> VersionPins:
        """:raise VersionError: for anything that is not a pin this build knows."""
        if not isinstance(data, dict) or set(data) != {"sdei", "sdei_vendor", "psci"}:
            raise VersionError(f"pinned versions record is malformed: {data!r}")
        vendor = data["sdei_vendor"]
        if not isinstance(vendor, int) or not 0 <= vendor <= 0xFFFF_FFFF:
            raise VersionError(f"pinned SDEI vendor {vendor!r} is not a 32-bit value")
        return cls(
            sdei=parse_version(str(data["sdei"]), known=SDEI_FUNCTIONS, what="pinned SDEI"),
            sdei_vendor=vendor,
            psci=parse_version(str(data["psci"]), known=PSCI_FUNCTIONS, what="pinned PSCI"),
        )


@dataclass(frozen=True)
class VersionRequest:
    """What the config asks for: SDEI "1.0" / "1.1" / "latest"; PSCI "0.2" / "1.0" / "1.1" / "auto"."""

    sdei: str = "latest"
    sdei_vendor: int = 0
    psci: str = "auto"

    def validate(self) -> None:
        """:raise VersionError: for a request no negotiation could satisfy."""
        if self.sdei != "latest":
            parse_version(self.sdei, known=SDEI_FUNCTIONS, what="SDEI")
        if self.psci != "auto":
            parse_version(self.psci, known=PSCI_FUNCTIONS, what="PSCI")
        if not 0 <= self.sdei_vendor <= 0xFFFF_FFFF:
            raise VersionError(f"SDEI vendor {self.sdei_vendor:#x} does not fit in 32 bits")


@dataclass(frozen=True)
class Negotiation:
    pins: VersionPins
    #: True when nothing was pinned before: these versions are now the guest's for good.
    newly_pinned: bool
    #: Requests that were overruled by the pins, in words for the log.
    warnings: tuple[str, ...] = ()


def honourable_psci(qemu_psci: Version) -> list[Version]:
    """PSCI versions we can present on a QEMU that implements ``qemu_psci``.

    We answer PSCI_VERSION ourselves and refuse functions the pinned version lacks, so any known
    version up to QEMU's own can be shown; a higher one would need functions QEMU does not have.
    """
    return [v for v in sorted(PSCI_FUNCTIONS) if v <= qemu_psci]


def negotiate(request: VersionRequest, *, qemu_psci: Version, pinned: VersionPins | None) -> Negotiation:
    """Decide the versions for this attach.

    :param request: what the config asks for.
    :param qemu_psci: the PSCI version this QEMU implements for the guest.
    :param pinned: what the guest has already seen (state directory or migration source), if anything.
    :raise VersionError: the request or the pins cannot be honoured on this QEMU.
    """
    request.validate()
    wanted_sdei = (
        SDEI_LATEST if request.sdei == "latest" else parse_version(request.sdei, known=SDEI_FUNCTIONS, what="SDEI")
    )
    offered = honourable_psci(qemu_psci)
    if not offered:
        raise VersionError(f"this QEMU implements PSCI {format_version(qemu_psci)}, older than any version we support")
    if request.psci == "auto":
        wanted_psci = offered[-1]
    else:
        wanted_psci = parse_version(request.psci, known=PSCI_FUNCTIONS, what="PSCI")

    if pinned is None:
        if wanted_psci not in offered:
            raise VersionError(
                f"PSCI {format_version(wanted_psci)} was requested but this QEMU implements only "
                f"up to {format_version(qemu_psci)}"
            )
        return Negotiation(VersionPins(wanted_sdei, request.sdei_vendor, wanted_psci), newly_pinned=True)

    if pinned.psci not in offered:
        raise VersionError(
            f"the guest was pinned to PSCI {format_version(pinned.psci)}, which this QEMU "
            f"(PSCI {format_version(qemu_psci)}) cannot honour; refusing rather than changing it under the guest"
        )
    warnings = []
    if wanted_sdei != pinned.sdei or request.sdei_vendor != pinned.sdei_vendor:
        warnings.append(
            f"config asks for SDEI {format_version(wanted_sdei)} (vendor {request.sdei_vendor:#x}) but the guest "
            f"has seen SDEI {format_version(pinned.sdei)} (vendor {pinned.sdei_vendor:#x}); keeping what it saw"
        )
    if request.psci != "auto" and wanted_psci != pinned.psci:
        warnings.append(
            f"config asks for PSCI {format_version(wanted_psci)} but the guest has seen PSCI "
            f"{format_version(pinned.psci)}; keeping what it saw"
        )
    return Negotiation(pinned, newly_pinned=False, warnings=tuple(warnings))


def accept_incoming(local: VersionPins | None, incoming: VersionPins, *, qemu_psci: Version) -> VersionPins:
    """A migration destination adopts the source's pins, or refuses the migration.

    The guest already saw ``incoming``; we never raise (or lower) it silently. If this QEMU cannot
    present it, or this VM had already pinned something else, the state is refused.
    """
    if incoming.psci not in honourable_psci(qemu_psci):
        raise VersionError(
            f"incoming guest is pinned to PSCI {format_version(incoming.psci)}, which this QEMU "
            f"(PSCI {format_version(qemu_psci)}) cannot honour"
        )
    if local is not None and local != incoming:
        raise VersionError(f"incoming guest pins {incoming.to_dict()} differ from this VM's pins {local.to_dict()}")
    return incoming


def psci_answer(pinned: Version, fid: int, x1: int) -> int | None:
    """Filter a PSCI call for the pinned version: the value to answer, or None to pass it to QEMU.

    PSCI_VERSION answers the pinned version; a function the pinned version lacks (including
    PSCI_FEATURES itself on 0.2) answers NOT_SUPPORTED, and so does PSCI_FEATURES asked about one.
    Everything else is QEMU's business. ``fid`` must already be decoded (:func:`function_id`: no
    SVE hint); the id PSCI_FEATURES asks about is decoded here, so a hinted query is still matched.
    """
    functions = PSCI_FUNCTIONS[pinned]
    if fid == psci.Function.PSCI_VERSION:
        return psci.encode_version(*pinned)
    if psci.is_psci_range(fid) and fid not in functions:
        return psci.NOT_SUPPORTED
    if fid == psci.Function.PSCI_FEATURES:
        queried = function_id(x1)
        if psci.is_psci_range(queried) and queried not in functions:
            return psci.NOT_SUPPORTED
    return None
