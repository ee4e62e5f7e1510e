"""The Linux event guest's header package names, for both Debian naming schemes (no apt, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.linux_guest import HeaderPackages, LinuxGuestBuildError, headers_package_for, kbuild_compiler

BOOKWORM_61 = "linux-headers-6.1.0-56-common (= 6.1.192-2), linux-kbuild-6.1 (>= 6.1.192-2), gcc-12"
TRIXIE_612 = (
    " linux-base (>= 4.12~), linux-headers-6.12.117+deb13-common (= 6.12.117-1),"
    " linux-image-6.12.117+deb13-arm64 (= 6.12.117-1) | linux-image-6.12.117+deb13-arm64-unsigned (= 6.12.117-1),"
    " linux-kbuild-6.12.117+deb13, gcc-14"
)


def test_bookworm_packages() -> None:
    assert headers_package_for("linux-image-6.1.0-56-arm64") == "linux-headers-6.1.0-56-arm64"
    packages = HeaderPackages.from_depends("linux-headers-6.1.0-56-arm64", "6.1.192-2", BOOKWORM_61)
    assert packages.release == "6.1.0-56-arm64"
    assert packages.specs() == [
        "linux-headers-6.1.0-56-arm64:arm64=6.1.192-2",
        "linux-headers-6.1.0-56-common=6.1.192-2",
        "linux-kbuild-6.1=6.1.192-2",
    ]


def test_trixie_packages() -> None:
    headers = headers_package_for("linux-image-6.12.117+deb13-arm64-unsigned")
    assert headers == "linux-headers-6.12.117+deb13-arm64"
    packages = HeaderPackages.from_depends(headers, "6.12.117-1", TRIXIE_612)
    assert packages.release == "6.12.117+deb13-arm64"
    assert packages.specs() == [
        "linux-headers-6.12.117+deb13-arm64:arm64=6.12.117-1",
        "linux-headers-6.12.117+deb13-common=6.12.117-1",
        "linux-kbuild-6.12.117+deb13=6.12.117-1",
    ]


def test_unusable_names_are_refused() -> None:
    with pytest.raises(LinuxGuestBuildError, match="headers package for linux-libc-dev"):
        headers_package_for("linux-libc-dev")
    with pytest.raises(LinuxGuestBuildError, match="does not depend on common headers and kbuild"):
        HeaderPackages.from_depends("linux-headers-x-arm64", "1", "linux-base, gcc-14")


def test_kbuild_compiler_follows_the_headers(tmp_path: Path) -> None:
    (tmp_path / ".kernelvariables").write_text(
        "CCACHE = ccache\nCC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-14\n"
    )
    assert kbuild_compiler(tmp_path) == "aarch64-linux-gnu-gcc-14"
    (tmp_path / ".kernelvariables").unlink()
    assert kbuild_compiler(tmp_path) == "aarch64-linux-gnu-gcc"
