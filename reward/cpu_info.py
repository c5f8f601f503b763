"""What the CPU says of itself: one reader of /proc/cpuinfo for the rules that depend on the vendor (weight packing)
and for the reports that name the machine their numbers were measured on."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (e.g. "vendor_id", "model name"); None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name, or what `platform` knows where /proc/cpuinfo has none (macOS, Windows)."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()
