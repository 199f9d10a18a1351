"""Shared by the GPU scripts: PASS/FAIL reporting and the exit status."""

from __future__ import annotations

import sys

failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    """Print one PASS/FAIL line and remember failures; returns ``ok``."""
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        failures.append(name)
    return ok


def finish() -> None:
    """Print the verdict and exit non-zero on any failed check."""
    print("FAILED: " + ", ".join(failures) if failures else "ALL PASSED")
    sys.exit(1 if failures else 0)
