"""The machine a benchmark ran on, for its record: timings compare only on one CPU kind (AVX2 vs AVX-512)."""

from __future__ import annotations

import platform
import subprocess


def cpu_kind() -> str:
    """lscpu's model name, CPU count and whether AVX-512 is there; the platform's processor name without lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        avx = "AVX-512" if "avx512f" in fields.get("Flags", "") else "no AVX-512"
        return f"{fields['Model name'].strip()}, {fields['CPU(s)'].strip()} CPUs, {avx}"
    except (OSError, subprocess.CalledProcessError, KeyError):
        return platform.processor() or platform.machine()
