"""The /proc/cpuinfo reader behind the packing rule and the reports' machine names."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlaifv.reward.cpu_info import cpu_name, cpuinfo_field


def test_fields_are_read_as_the_file_says_and_absent_ones_are_none() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo here")
    lines = [line for line in cpuinfo.read_text().splitlines() if ":" in line]
    key, _, value = lines[0].partition(":")
    assert cpuinfo_field(key.strip()) == value.strip()
    assert cpuinfo_field("no such field") is None
    model = next((line.partition(":")[2].strip() for line in lines if line.startswith("model name")), None)
    assert cpu_name() == model if model else cpu_name()
