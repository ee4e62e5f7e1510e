"""Fetch a stock Debian arm64 kernel ``Image`` for the Linux boot test, once, and cache it.

The boot test wants a real distribution kernel, not one we built, so that "Linux detects our SDEI"
means what a user would see. Debian's arm64 kernel package ships ``/boot/vmlinuz-*`` as a plain
(uncompressed) arm64 ``Image`` that QEMU boots with ``-kernel``. We get it with the ordinary apt
client on a Debian host (multiarch ``arm64`` added if needed), take only ``boot/`` out of the
package (the modules are ~400 MB we never use), and keep it under the cache root keyed by package
name and version.

Which kernel: unless told otherwise, whatever Debian's ``linux-image-arm64`` meta-package currently
points at. That is the newest image of the release's default series (6.1 on bookworm, which has the
DT SDEI fix from 6.1.192 on); the backported 6.12 series is available by passing its package name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qmp_sdei.cache import cache_root, locked
from qmp_sdei.errors import KernelFetchError

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "linux-image-arm64"
"""Debian's meta-package for the default arm64 kernel; we follow its dependency to the real image."""

_ARCH = "arm64"
_MAX_META_HOPS = 3


@dataclass(frozen=True)
class DebianKernel:
    """A resolved, unpacked kernel package."""

    package: str
    version: str
    image: Path

    @property
    def config(self) -> Path | None:
        """The ``/boot/config-*`` shipped beside the image, for checking ``CONFIG_*`` options."""
        found = sorted(self.image.parent.glob("config-*"))
        return found[0] if found else None


def default_kernel_cache() -> Path:
    return cache_root() / "kernels"


def _run(argv: list[str], what: str, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise KernelFetchError(f"{what}: {argv[0]} not found; fetching a Debian kernel needs a Debian/apt host")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd)
    except subprocess.TimeoutExpired as err:
        raise KernelFetchError(f"{what}: {' '.join(argv)} did not finish within {timeout}s") from err


def _check(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise KernelFetchError(f"{what} failed (exit {result.returncode}): {' | '.join(detail)}")
    return result.stdout


def _ensure_arm64_architecture(timeout: float) -> bool:
    """Add the arm64 dpkg architecture if missing; return True if apt lists must be refreshed."""
    foreign = _check(_run(["dpkg", "--print-foreign-architectures"], "listing dpkg architectures", timeout), "dpkg")
    native = _run(["dpkg", "--print-architecture"], "reading the dpkg architecture", timeout).stdout.strip()
    if _ARCH in foreign.split() or native == _ARCH:
        return False
    result = _run(["dpkg", "--add-architecture", _ARCH], "adding the arm64 architecture", timeout)
    if result.returncode != 0:
        raise KernelFetchError(
            "cannot add the arm64 dpkg architecture (run as root, or do it once by hand: "
            f"'dpkg --add-architecture arm64 && apt-get update'): {result.stderr.strip()}"
        )
    return True


def _apt_update(timeout: float) -> None:
    result = _run(["apt-get", "update", "-q"], "refreshing apt lists", timeout)
    if result.returncode != 0:
        raise KernelFetchError(
            f"apt-get update failed (exit {result.returncode}; needs root and network): "
            + " | ".join(result.stderr.strip().splitlines()[-3:])
        )


def _apt_show(package: str, timeout: float) -> dict[str, str] | None:
    """The candidate version's control fields, or None if apt does not know the package (yet)."""
    result = _run(["apt-cache", "show", "--no-all-versions", f"{package}:{_ARCH}"], "apt-cache show", timeout)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    fields: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields.setdefault(key, value.strip())
    return fields


def _image_dependency(fields: dict[str, str]) -> tuple[str, str] | None:
    """For a meta-package, the ``linux-image-*`` package (and pinned version) it depends on."""
    for alternative in fields.get("Depends", "").split(","):
        match = re.match(r"\s*(linux-image-[^\s:(|]+)(?::\w+)?\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", alternative)
        if match:
            return match.group(1), match.group(2) or ""
    return None


def resolve_debian_kernel(package: str = DEFAULT_PACKAGE, *, timeout: float = 300.0) -> tuple[str, str]:
    """Return ``(package, version)`` of the real image package that ``package`` names or points to.

    Runs ``apt-get update`` only when apt does not know the package yet (fresh multiarch setup or
    empty lists), because it is slow and needs root while the rest does not.
    """
    updated = False
    if _ensure_arm64_architecture(timeout):
        _apt_update(timeout)
        updated = True
    name = package
    for _ in range(_MAX_META_HOPS):
        fields = _apt_show(name, timeout)
        if fields is None and not updated:
            _apt_update(timeout)
            updated = True
            fields = _apt_show(name, timeout)
        if fields is None:
            raise KernelFetchError(f"apt knows no package {name}:{_ARCH} (see 'apt-cache search linux-image')")
        dependency = _image_dependency(fields)
        if dependency is None:  # a real image package: depends on kmod/initramfs-tools, not on an image
            return fields["Package"], fields["Version"]
        name = dependency[0]
    raise KernelFetchError(f"{package}: more than {_MAX_META_HOPS} meta-packages deep, giving up")


def _cached_image(entry: Path) -> Path | None:
    found = sorted((entry / "boot").glob("vmlinuz-*"))
    return found[0] if found else None


def _extract_boot(deb: Path, dest: Path, timeout: float) -> None:
    """Unpack only ``./boot/`` from a .deb, streaming ``dpkg-deb --fsys-tarfile`` through tarfile.

    Debian packs the data tarball in path order, so ``boot/`` comes before ``lib/modules``; we stop
    at the first path after ``boot/`` instead of reading the whole ~400 MB archive.
    """
    if shutil.which("dpkg-deb") is None:
        raise KernelFetchError("dpkg-deb not found; unpacking the kernel package needs dpkg")
    with subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        seen_boot = False
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as archive:
                for member in archive:
                    parts = PurePosixPath(member.name).parts
                    parts = parts[1:] if parts[:1] == (".",) else parts
                    if parts[:1] == ("boot",):
                        seen_boot = True
                        archive.extract(member, dest, filter="data")
                    elif seen_boot:
                        break
        except tarfile.TarError as err:
            raise KernelFetchError(f"cannot unpack {deb.name}: {err}") from err
        finally:
            if proc.poll() is None:
                proc.kill()  # we stopped reading early; dpkg-deb would block on a full pipe
            proc.wait(timeout)
    if not seen_boot:
        raise KernelFetchError(f"{deb.name} has no boot/ directory: not a kernel image package")


def fetch_debian_kernel(
    cache_dir: Path | str | None = None, *, package: str = DEFAULT_PACKAGE, timeout: float = 900.0
) -> Path:
    """Return the path of a cached or freshly downloaded Debian arm64 ``boot/vmlinuz-*``.

    See :func:`fetch_debian_kernel_package` for details; this returns just the image path.
    """
    return fetch_debian_kernel_package(cache_dir, package=package, timeout=timeout).image


def fetch_debian_kernel_package(
    cache_dir: Path | str | None = None, *, package: str = DEFAULT_PACKAGE, timeout: float = 900.0
) -> DebianKernel:
    """Resolve, download (``apt-get download``) and unpack a Debian arm64 kernel, cached by version.

    ``package`` may be the meta-package (default) or a concrete ``linux-image-<abi>-arm64``. If apt
    cannot be asked (offline, not root, not Debian) but a kernel is already cached, the newest cached
    one is used with a warning, so a warm cache keeps the boot test working.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_kernel_cache()
    try:
        name, version = resolve_debian_kernel(package, timeout=timeout)
    except KernelFetchError as err:
        cached = sorted(
            (entry for entry in cache.glob("linux-image-*") if _cached_image(entry)),
            key=lambda entry: entry.stat().st_mtime,
        )
        if not cached:
            raise
        log.warning("cannot ask apt (%s); using cached %s", err, cached[-1].name)
        name, _, version = cached[-1].name.partition("_")
        image = _cached_image(cached[-1])
        assert image is not None
        return DebianKernel(name, version.replace("%3a", ":"), image)

    entry = cache / f"{name}_{version.replace(':', '%3a')}"
    with locked(cache):
        image = _cached_image(entry)
        if image is not None:
            return DebianKernel(name, version, image)
        work = Path(tempfile.mkdtemp(dir=cache, prefix=".fetch-"))
        try:
            spec = f"{name}:{_ARCH}={version}"
            # apt-get download writes into its working directory, so point that at our scratch dir.
            _check(_run(["apt-get", "download", "-q", spec], f"downloading {name}", timeout, cwd=work), spec)
            debs = sorted(work.glob("*.deb"))
            if not debs:
                raise KernelFetchError(f"apt-get download {spec} reported success but wrote no .deb")
            unpacked = work / "unpacked"
            _extract_boot(debs[0], unpacked, timeout)
            if _cached_image(unpacked) is None:
                raise KernelFetchError(f"{name} {version} has no boot/vmlinuz-*")
            os.replace(unpacked, entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    image = _cached_image(entry)
    assert image is not None
    return DebianKernel(name, version, image)
