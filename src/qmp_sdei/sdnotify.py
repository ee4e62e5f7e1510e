"""Tell systemd how the sidecar is doing (``sd_notify``), for ``Type=notify`` units.

systemd passes a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract socket written with a
leading ``@``); each message is newline-separated ``KEY=value`` lines: ``READY=1`` once the sidecar
is attached and serving, ``STOPPING=1`` when it begins to shut down, ``STATUS=...`` one line for
``systemctl status``, ``WATCHDOG=1`` to pet a ``WatchdogSec=`` watchdog.

What it must not do: fail the sidecar. Without ``$NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call is a no-op. A send that fails is logged once at WARNING and then only at
DEBUG, and never raises into the caller: losing a status line is better than losing the VM's SDEI
service. No dependency beyond the standard library; no asyncio (a datagram send to a local socket
does not block meaningfully).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger("qmp_sdei.sdnotify")

ENV_SOCKET = "NOTIFY_SOCKET"

_warned = False
_warned_lock = threading.Lock()


def _address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a ``sendto`` address; abstract sockets (``@name``) get a leading NUL."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # systemd also knows vsock: addresses; we do not run in a VM's guest


def _report(problem: str) -> None:
    global _warned  # one warning per process, whichever call fails first
    with _warned_lock:
        first, _warned = not _warned, True
    log.log(logging.WARNING if first else logging.DEBUG, "cannot notify systemd: %s", problem)


def notify(*lines: str) -> bool:
    """Send ``lines`` (``KEY=value``) as one message. True if sent; False if not under systemd or failed."""
    value = os.environ.get(ENV_SOCKET, "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        _report(f"${ENV_SOCKET}={value!r} is neither a path nor an abstract socket")
        return False
    for line in lines:
        if "\n" in line or "=" not in line:
            _report(f"not a KEY=value line: {line!r}")
            return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as err:
        _report(f"{value}: {err.strerror or err}")
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status_text: str = "") -> bool:
    """The sidecar is attached and serving (``READY=1``), with an optional status line."""
    lines = ["READY=1"]
    if status_text:
        lines.append(f"STATUS={_one_line(status_text)}")
    return notify(*lines)


def stopping(status_text: str = "") -> bool:
    """The sidecar is shutting down (``STOPPING=1``), with an optional status line (the reason)."""
    lines = ["STOPPING=1"]
    if status_text:
        lines.append(f"STATUS={_one_line(status_text)}")
    return notify(*lines)


def status(text: str) -> bool:
    """One line for ``systemctl status`` (newlines are folded into spaces)."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """Pet the unit's watchdog (``WATCHDOG=1``); harmless when the unit has none."""
    return notify("WATCHDOG=1")


def watchdog_period() -> float | None:
    """Seconds within which :func:`watchdog` must be called, or None without a watchdog for us.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must be this process) when the
    unit has ``WatchdogSec=``. Pet it at half this period.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6
