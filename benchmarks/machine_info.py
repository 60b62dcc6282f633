"""The CPU a benchmark ran on, named next to its timings (sessions run on different machines)."""

import platform
from pathlib import Path


def cpu_model_and_flags() -> tuple:
    """The CPU's model name, its number of logical CPUs and its feature flags, from /proc/cpuinfo where there
    is one (else what `platform` knows, 0 and no flags)."""
    model, count, flags = platform.processor() or platform.machine(), 0, set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, count, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model, count = value.strip(), count + 1
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, count, flags
