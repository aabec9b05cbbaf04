"""Where the gated cells' time goes on a CPU: the matmul rates each contender reaches at the LSTM's shapes.

    python benchmarks/matmul_rates.py [--quick] [--rounds R] [--march ARCH] [--out FILE]

For each of ``bptt_speed.GATED_SHAPES`` (T, B, N, N1, M), the LSTM's four kinds of matmul, C [m, n]
= A [m, k] W [k, n], in GFLOP/s (2 m k n flops over the median time):

  step forward   h(t-1) Wh          m = B,     k = N1,    n = 4 N1   (once per step)
  step reverse   dG(t) Wh^T         m = B,     k = 4 N1,  n = N1     (once per step)
  projection     X Wx               m = T B,   k = N,     n = 4 N1   (once per sequence)
  weight grad    h^T dG  (dWh)      m = N1,    k = T B,   n = 4 N1   (once per sequence)

measured for XLA's dot (jitted, float32, this jax's default CPU options), PyTorch's matmul (2 threads
and 1; oneDNN / MKL, where torch imports), and, for the two per-step kinds, the compiled kernel's own
matmul (``bptt_jax/core/cell_kernels.cc``: Wh packed once; one thread, and two) and OpenBLAS's sgemm on one
thread (the ``scipy-openblas32`` wheel, where installed), by the C++ harness
``benchmarks/native/gemm_rates.cc`` (compiled here with ``g++ -O3 -march=native``; ``--march
haswell`` builds what an AVX2 machine builds, for a processor that can run it). JAX and torch
contenders run round-robin in this process; the harness runs alone after them.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]
nan = math.nan


def matmuls(shape) -> dict[str, tuple[int, int, int]]:
    t, b, n, n1, _ = shape
    return {
        "step forward": (b, n1, 4 * n1),
        "step reverse": (b, 4 * n1, n1),
        "projection": (t * b, n, 4 * n1),
        "weight grad": (n1, t * b, 4 * n1),
    }


def harness(
    mkns: list[tuple[int, int, int]], march: str = "native"
) -> dict[tuple[int, int, int], tuple[float, float, float]] | str:
    """{(m, k, n): (kernel GFLOP/s on one thread, on two, OpenBLAS GFLOP/s or 0)} from gemm_rates.cc,
    or why it did not run."""
    import jaxlib

    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return "no C++ compiler"
    include = Path(jaxlib.__file__).parent / "include"
    cmd = [cxx, "-std=c++17", "-O3", f"-march={march}", "-fopenmp-simd", "-pthread", f"-I{include}"]
    cmd.append(f"-I{ROOT / 'bptt_jax/core'}")
    cmd.append(str(ROOT / "benchmarks/native/gemm_rates.cc"))
    if importlib.util.find_spec("scipy_openblas32") is not None:
        import scipy_openblas32

        lib = scipy_openblas32.get_lib_dir()
        cmd += ["-DWITH_OPENBLAS", f"-L{lib}", f"-l{scipy_openblas32.get_library()}", f"-Wl,-rpath,{lib}"]
    with tempfile.TemporaryDirectory() as d:
        exe = str(Path(d) / "gemm_rates")
        built = subprocess.run([*cmd, "-o", exe], capture_output=True, text=True)
        if built.returncode != 0:
            return f"the harness did not compile: {built.stderr.strip()[-300:]}"
        args = [str(v) for mkn in mkns for v in mkn]
        out = subprocess.run([exe, *args], capture_output=True, text=True, check=True).stdout
    rates = {}
    for line in out.splitlines():
        m, k, n, ours, two, blas, diff = line.split()
        if float(diff) > 1e-3 * int(k):
            raise AssertionError(f"({m}, {k}, {n}): the kernel's matmul differs from OpenBLAS's by {diff}")
        rates[int(m), int(k), int(n)] = (float(ours), float(two), float(blas))
    return rates


def jax_torch(mkns, rounds: int) -> dict[tuple[int, int, int], dict[str, float]]:
    """{(m, k, n): {contender: GFLOP/s}} for XLA's dot and torch's matmul (2 threads, 1 thread)."""
    try:
        import torch
    except Exception:
        torch = None
    out = {}
    for m, k, n in mkns:
        rng = np.random.RandomState(0)
        a, w = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
        ja, jw = jnp.asarray(a), jnp.asarray(w)
        dot = jax.jit(jnp.matmul).lower(ja, jw).compile()
        runners = {"xla": lambda dot=dot, ja=ja, jw=jw: dot(ja, jw).block_until_ready()}
        if torch is not None:
            ta, tw = torch.from_numpy(a), torch.from_numpy(w)

            def torch_run(threads, ta=ta, tw=tw):
                torch.set_num_threads(threads)
                return ta @ tw

            runners["torch 2 threads"] = lambda: torch_run(2)
            runners["torch 1 thread"] = lambda: torch_run(1)
        med = bptt_speed.round_robin(runners, rounds)
        out[m, k, n] = {name: 2 * m * k * n / s / 1e9 for name, s in med.items()}
    return out


def _rate(v: float) -> str:
    """GFLOP/s to one decimal; below 1 (a tiny matmul's dispatch-bound rate) two significant digits."""
    return f"{v:.1f}" if not v < 1 else f"{v:.2g}"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 21; quick 3)")
    ap.add_argument("--march", default="native", help="g++ -march for the kernel's harness (default native)")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 21)
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES
    mkns = list(dict.fromkeys(mkn for s in shapes for mkn in matmuls(s).values()))
    rates = jax_torch(mkns, rounds)
    steps = [mkn for s in shapes for kind, mkn in matmuls(s).items() if kind.startswith("step")]
    native = harness(steps, args.march)
    lines = gate_blocks.header("Matmul rates at the LSTM's shapes", "matmul_rates.py", argv, rounds)
    if isinstance(native, str):
        lines += [f"The kernel's matmul: not measured ({native}).", ""]
        native = {}
    lines += [
        f"GFLOP/s (higher is faster). kernel: the compiled kernel's own per-step matmul (-march={args.march}), on one thread and",
        "split over two (as the kernel runs it from 2^23 multiply-adds on); OpenBLAS: its sgemm on one thread",
        "(0: scipy-openblas32 not installed); these only for the per-step kinds. XLA and torch: single calls",
        "(at the per-step sizes their dispatch cost dominates).",
        "",
        "| (T, B, N, N1, M) | matmul | m, k, n | XLA dot | torch 2 threads | torch 1 thread | kernel 1 thread "
        "| kernel 2 threads | OpenBLAS 1 thread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for kind, mkn in matmuls(shape).items():
            r = rates[mkn]
            ours, two, blas = native.get(mkn, (nan,) * 3)
            cells = (r["xla"], r.get("torch 2 threads", nan), r.get("torch 1 thread", nan), ours, two, blas)
            lines.append(f"| {shape} | {kind} | {mkn} | " + " | ".join(map(_rate, cells)) + " |")
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
