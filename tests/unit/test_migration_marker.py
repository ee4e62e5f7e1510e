"""The marker a source sidecar keeps while an outgoing migration runs, read by its successor."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmp_sdei.migration import MigrationAgent


@pytest.mark.parametrize(
    ("text", "running"),
    [
        ('{"vm_running": true, "pid": 1}', True),
        ('{"vm_running": false, "pid": 1}', False),
        ("{not json", False),
        ("[1, 2]", False),
        ("", False),
    ],
)
def test_the_marker_says_whether_the_guest_was_running(tmp_path: Path, text: str, running: bool) -> None:
    marker = tmp_path / "migration.json"
    marker.write_text(text)
    assert MigrationAgent._read_marker(marker) is running


def test_no_marker_means_no_migration_was_running(tmp_path: Path) -> None:
    assert MigrationAgent._read_marker(tmp_path / "migration.json") is False
