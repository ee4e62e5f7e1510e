"""The ``[metrics]`` config table: where the Prometheus exporter listens, if anywhere.

Policy layer, like :mod:`qmp_sdei.config` (which calls :func:`parse_metrics_table`): pure, no I/O,
imports nothing but the error tree. The exporter itself is :mod:`qmp_sdei.metrics`.

::

    [metrics]
    listen = "127.0.0.1:9464"   # IP literal and port; "[::1]:9464" for IPv6
    allow_remote = false        # true to listen on a non-loopback address (no auth, no TLS!)

No table means no exporter. The exporter has no authentication or TLS, and what it exposes (VM name,
event activity) is about a guest, so a non-loopback address is refused unless ``allow_remote = true``
says the operator put something (a firewall, a reverse proxy with TLS) in front of it. Host names
are refused: resolving them would be I/O, and "localhost" may resolve to a non-loopback address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qmp_sdei.errors import ConfigError

DEFAULT_PORT = 9464  # the examples' port; each sidecar on a host needs its own


@dataclass(frozen=True)
class MetricsSettings:
    """Where the exporter listens; absent (``None`` in the config) when metrics are off."""

    host: str
    port: int
    allow_remote: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


def parse_listen(text: str, *, allow_remote: bool, key: str = "metrics.listen") -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (ip, port). :raise ConfigError: naming ``key``."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not IP:PORT (e.g. 127.0.0.1:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT})")
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise ConfigError(f"{key}: {host!r} is not an IP address (host names are not resolved)") from None
    if address.version == 6 and not bracketed:
        raise ConfigError(f"{key}: write an IPv6 address in brackets: [{bare}]:{port}")
    if not address.is_loopback and not allow_remote:
        raise ConfigError(
            f"{key}: {bare} is not a loopback address; the exporter has no authentication, so set "
            "metrics.allow_remote = true only with a firewall or TLS proxy in front of it"
        )
    return bare, int(port)


def parse_metrics_table(raw: Mapping[str, Any]) -> MetricsSettings | None:
    """Validate a decoded ``[metrics]`` table (empty or absent: metrics off). :raise ConfigError:"""
    if not isinstance(raw, Mapping):
        raise ConfigError("metrics: must be a table")
    if not raw:
        return None
    unknown = sorted(set(raw) - {"listen", "allow_remote"})
    if unknown:
        raise ConfigError(f"metrics.{unknown[0]}: unknown key")
    allow_remote = raw.get("allow_remote", False)
    if not isinstance(allow_remote, bool):
        raise ConfigError(f"metrics.allow_remote: expected true/false, got {type(allow_remote).__name__}")
    listen = raw.get("listen")
    if listen is None:
        raise ConfigError(f"metrics.listen: is required when [metrics] is present (127.0.0.1:{DEFAULT_PORT})")
    if not isinstance(listen, str):
        raise ConfigError(f"metrics.listen: expected a string, got {type(listen).__name__} {listen!r}")
    host, port = parse_listen(listen, allow_remote=allow_remote)
    return MetricsSettings(host=host, port=port, allow_remote=allow_remote)
