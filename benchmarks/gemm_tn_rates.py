"""GFLOP/s of the kernel's own matmuls for the weight-gradient sums (gemm_tn) beside its packed gemm.

    python benchmarks/gemm_tn_rates.py [--baseline REV] [--without FLAG] [--out FILE]

Builds ``benchmarks/native/gemm_tn_rates.cc`` (which includes ``bptt_jax/core/cell_kernels.cc`` whole)
with the flags the library builds the kernel with, against jaxlib's FFI headers, and runs it: one
thread, best of 7 rounds of 30 calls. gemm_tn is what the reverse calls' helper thread sums dWx =
X^T dA and dWh = h(t-1)^T dA with, chunk by chunk; the packed gemm is the per-step matmul's. With
``--baseline REV`` the same program is also built from git revision REV's ``cell_kernels.cc``, with
``--without FLAG`` from this tree without that compiler flag, and the builds run one after the
other, three times alternating (each figure the best of its runs). Also timed: the LSTM's gate
arithmetic per step (``forward_row``, ``reverse_row`` over B = 32 rows of N1 = 256), microseconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gate_blocks  # noqa: E402

from bptt_jax.core import native  # noqa: E402


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="also build and time this git revision's cell_kernels.cc")
    ap.add_argument(
        "--without", help="also build this tree without this compiler flag (e.g. -mprefer-vector-width=512)"
    )
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    import jaxlib

    include = Path(jaxlib.__file__).parent / "include"
    flags = [f for f in native.FLAGS if f not in ("-shared", "-fPIC")]
    lines = gate_blocks.header("The kernel's matmuls for the weight-gradient sums", "gemm_tn_rates.py", argv, 7)
    src = ROOT / "benchmarks" / "native" / "gemm_tn_rates.cc"
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"this tree": []}
        if args.baseline:
            old = Path(tmp) / "cell_kernels_baseline.cc"
            text = subprocess.run(
                ["git", "show", f"{args.baseline}:bptt_jax/core/cell_kernels.cc"],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            old.write_text(text)
            builds[f"revision {args.baseline}"] = [f'-DCELL_KERNELS="{old}"']
        exes = {}
        for name, extra in builds.items():
            exe = Path(tmp) / f"rates{len(exes)}"
            subprocess.run(["g++", *flags, *extra, f"-I{include}", str(src), "-o", str(exe), "-lpthread"], check=True)
            exes[name] = exe
        if args.without:
            exe = Path(tmp) / "rates_without"
            kept = [f for f in flags if f != args.without]
            subprocess.run(["g++", *kept, f"-I{include}", str(src), "-o", str(exe), "-lpthread"], check=True)
            exes[f"without {args.without}"] = exe
        best: dict = {}
        for _ in range(3 if len(exes) > 1 else 1):
            for name, exe in exes.items():
                out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
                for row in out.splitlines()[2:]:
                    cells = [c.strip() for c in row.strip("|").split("|")]
                    key = (cells[0], cells[1])
                    best.setdefault(key, {})
                    if cells[3] == "-":  # microseconds: the least
                        best[key][name] = min(best[key].get(name, float("inf")), float(cells[2]))
                    else:  # GFLOP/s: the most
                        best[key][name] = max(best[key].get(name, 0.0), float(cells[3]))
    names = list(exes)
    lines[2] = lines[2].replace("7 rounds, random order, medians", "best of 7 rounds of 30 calls, one thread")
    lines += ["| part | m, n, k (rows: B, N1) | " + " | ".join(f"GFLOP/s (rows: us), {n}" for n in names) + " |"]
    lines += ["|---|---|" + "---|" * len(names)]
    for (kind, shape), rates in best.items():
        lines.append(f"| {kind} | {shape} | " + " | ".join(f"{rates[n]:.1f}" for n in names) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return report


if __name__ == "__main__":
    main()
