"""The [metrics] table: loopback by default, clear errors for everything else."""

from __future__ import annotations

from typing import Any

import pytest

from qmp_sdei.errors import ConfigError
from qmp_sdei.metrics_settings import MetricsSettings, parse_metrics_table


def test_no_table_means_no_exporter() -> None:
    assert parse_metrics_table({}) is None


@pytest.mark.parametrize(
    ("listen", "host", "port", "url"),
    [
        ("127.0.0.1:9464", "127.0.0.1", 9464, "http://127.0.0.1:9464/metrics"),
        ("127.0.0.53:1", "127.0.0.53", 1, "http://127.0.0.53:1/metrics"),
        ("[::1]:9464", "::1", 9464, "http://[::1]:9464/metrics"),
    ],
)
def test_loopback_addresses(listen: str, host: str, port: int, url: str) -> None:
    settings = parse_metrics_table({"listen": listen})
    assert settings == MetricsSettings(host=host, port=port)
    assert settings.url == url


def test_a_remote_address_needs_allow_remote() -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.listen: 0\.0\.0\.0 is not a loopback address"):
        parse_metrics_table({"listen": "0.0.0.0:9464"})
    settings = parse_metrics_table({"listen": "0.0.0.0:9464", "allow_remote": True})
    assert settings == MetricsSettings("0.0.0.0", 9464, allow_remote=True)  # noqa: S104 (a parsed value)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"listen": "localhost:9464"}, r"metrics\.listen: 'localhost' is not an IP address"),
        ({"listen": "127.0.0.1"}, r"metrics\.listen: '127\.0\.0\.1' is not IP:PORT"),
        ({"listen": "127.0.0.1:0"}, r"is not IP:PORT"),
        ({"listen": "127.0.0.1:65536"}, r"is not IP:PORT"),
        ({"listen": "127.0.0.1:-1"}, r"is not IP:PORT"),
        ({"listen": "::1:9464"}, r"write an IPv6 address in brackets"),
        ({"listen": 9464}, r"metrics\.listen: expected a string"),
        ({"allow_remote": True}, r"metrics\.listen: is required"),
        ({"listen": "127.0.0.1:9464", "allow_remote": "yes"}, r"metrics\.allow_remote: expected true/false"),
        ({"listen": "127.0.0.1:9464", "port": 1}, r"metrics\.port: unknown key"),
        ([], r"metrics: must be a table"),
    ],
)
def test_bad_tables_name_the_key(table: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_metrics_table(table)
