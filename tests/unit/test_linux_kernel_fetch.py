"""Resolving and caching the Debian kernel, with apt replaced by a scripted stand-in (no network)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qmp_sdei import linux_kernel
from qmp_sdei.errors import KernelFetchError
from qmp_sdei.linux_kernel import _image_dependency, fetch_debian_kernel_package

META = "Package: linux-image-arm64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-arm64 (= 6.1.192-2)\n"
REAL = (
    "Package: linux-image-6.1.0-56-arm64\nVersion: 6.1.192-2\n"
    "Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool\n"
    "Description: Linux 6.1 for 64-bit ARMv8 machines (signed)\n description continues: here\n"
)


class FakeApt:
    """Answers the commands linux_kernel runs; records them so tests can check what was (not) run."""

    def __init__(self, *, arm64: bool = True, lists: bool = True, online: bool = True) -> None:
        self.arm64, self.lists, self.online = arm64, lists, online
        self.calls: list[list[str]] = []

    def __call__(
        self, argv: list[str], what: str, timeout: float, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)

        def done(out: str = "", status: int = 0, err: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.CompletedProcess(argv, status, out, err)

        match argv:
            case ["dpkg", "--print-foreign-architectures"]:
                return done("arm64\n" if self.arm64 else "")
            case ["dpkg", "--print-architecture"]:
                return done("amd64\n")
            case ["dpkg", "--add-architecture", "arm64"]:
                self.arm64 = True
                return done()
            case ["apt-get", "update", "-q"]:
                if not self.online:
                    return done(status=100, err="E: Failed to fetch")
                self.lists = True
                return done()
            case ["apt-cache", "show", "--no-all-versions", name]:
                known = {"linux-image-arm64:arm64": META, "linux-image-6.1.0-56-arm64:arm64": REAL}
                if not (self.lists and self.arm64) or name not in known:
                    return done(status=100, err="E: No packages found")
                return done(known[name])
        raise AssertionError(f"unexpected command {argv}")


def _cache_entry(cache: Path, name: str = "linux-image-6.1.0-56-arm64_6.1.192-2") -> Path:
    boot = cache / name / "boot"
    boot.mkdir(parents=True)
    (boot / "vmlinuz-6.1.0-56-arm64").write_bytes(b"image")
    (boot / "config-6.1.0-56-arm64").write_text("CONFIG_ARM_SDE_INTERFACE=y\n")
    return boot / "vmlinuz-6.1.0-56-arm64"


def test_dependency_parsing() -> None:
    assert _image_dependency({"Depends": "linux-image-6.1.0-56-arm64 (= 6.1.192-2)"}) == (
        "linux-image-6.1.0-56-arm64",
        "6.1.192-2",
    )
    assert _image_dependency({"Depends": "linux-image-6.12.117+deb12-arm64:arm64"}) == (
        "linux-image-6.12.117+deb12-arm64",
        "",
    )
    assert _image_dependency({"Depends": "kmod, linux-base (>= 4.3~)"}) is None
    assert _image_dependency({}) is None


def test_meta_package_resolves_to_cached_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = FakeApt()
    monkeypatch.setattr(linux_kernel, "_run", apt)
    image = _cache_entry(tmp_path)
    kernel = fetch_debian_kernel_package(tmp_path)
    assert (kernel.package, kernel.version, kernel.image) == (
        "linux-image-6.1.0-56-arm64",
        "6.1.192-2",
        image,
    )
    assert kernel.config == image.with_name("config-6.1.0-56-arm64")
    assert not [c for c in apt.calls if c[:2] in (["apt-get", "update"], ["apt-get", "download"])]


def test_fresh_host_adds_arm64_and_updates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    apt = FakeApt(arm64=False, lists=False)
    monkeypatch.setattr(linux_kernel, "_run", apt)
    _cache_entry(tmp_path)
    fetch_debian_kernel_package(tmp_path)
    assert ["dpkg", "--add-architecture", "arm64"] in apt.calls
    assert apt.calls.count(["apt-get", "update", "-q"]) == 1


def test_offline_uses_newest_cached_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux_kernel, "_run", FakeApt(lists=False, online=False))
    image = _cache_entry(tmp_path)
    kernel = fetch_debian_kernel_package(tmp_path)
    assert (kernel.package, kernel.version, kernel.image) == (
        "linux-image-6.1.0-56-arm64",
        "6.1.192-2",
        image,
    )


def test_offline_and_empty_cache_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux_kernel, "_run", FakeApt(lists=False, online=False))
    with pytest.raises(KernelFetchError, match="apt-get update failed"):
        fetch_debian_kernel_package(tmp_path)
    monkeypatch.setattr(linux_kernel, "_run", FakeApt())
    with pytest.raises(KernelFetchError, match="no package linux-image-nonesuch:arm64"):
        fetch_debian_kernel_package(tmp_path, package="linux-image-nonesuch")
