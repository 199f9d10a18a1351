"""pytest-benchmark helpers: a results table with ratios against the baseline of the same run.

Not collected by `make test` (which runs `pytest tests`); run these files explicitly.
"""
import pytest

RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture
def record(benchmark):
    """Run ``benchmark`` on a callable and remember its median under (group, name)."""

    def run(group: str, name: str, fn, *args):
        out = benchmark(fn, *args)
        RESULTS.setdefault(group, {})[name] = benchmark.stats.stats.median
        return out

    return run


def pytest_terminal_summary(terminalreporter):
    for group, rows in RESULTS.items():
        base_name = "sdpa" if "sdpa" in rows else "exact_svd" if "exact_svd" in rows else None
        base = rows.get(base_name)
        terminalreporter.write_sep("-", f"{group}: median ms, ratio = time / {base_name} (same run)")
        for name, sec in rows.items():
            ratio = f"{sec / base:7.2f}x" if base else "   -"
            terminalreporter.write_line(f"  {name:22s} {sec * 1e3:9.3f} ms   {ratio}")
