"""A quick run of the benchmark script on tiny shapes, so it never rots (no timing assertions)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_benchmark_script_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bptt_speed", ROOT / "benchmarks/bptt_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bptt_speed"] = mod  # flax modules defined in it need their module registered
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.md"
    report = mod.main(["--quick", "--rounds", "1", "--out", str(out)])
    assert out.read_text().strip() == report.strip()
    assert "| bptt |" in report and "| grad(naive scan) |" in report
    assert "bptt checkpoint_every=" in report
    # Every contender's gradients agree with the explicit BPTT (the last column).
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith(("| contender", "| variant")):
            assert float(line.rstrip(" |").split("|")[-1]) < 1e-4, line
