"""The time block under a 16-bit compute dtype: temp memory and time against float32's default call.

    python benchmarks/half_blocks.py [--quick] [--rounds R] [--cell elman|gru|lstm ...]
                                     [--shape T,B,N,N1,M ...] [--blocks C,C,...] [--out FILE]

Per cell and shape (one layer + softmax readout, as ``bptt_speed.py``): the default ``bptt`` call in
float32 (the compiled kernel where it runs: float32 only), the same spec with
``compute_dtype="bfloat16"`` at its automatic block (``plan.auto_block_size(..., half=True)``) and at
each block C of ``--blocks`` (default: a quarter, a fifth, a tenth and a twentieth of T, each moved
to a divisor of T); compiled temp memory (XLA's ``memory_analysis()``) and median time, each over
float32's, timed side by side in one process (round robin, a fresh random order each round).
Every bfloat16 call's loss is checked against float32's first (bfloat16's rounding: 5e-2 relative).

Issue 33's target: the default call's temp memory with bfloat16 compute at most 0.6x float32's.
This is the table behind ``plan.half_precision_block``'s whole-sequence rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import plan  # noqa: E402

SHAPES = [(50, 1, 32, 64, 32), (100, 32, 64, 128, 64)]  # the shapes float32 runs as one block
QUICK_SHAPES = [(12, 3, 5, 6, 7)]
CELLS = ("elman", "gru", "lstm")


def _divisor_at_most(t_len: int, c: int) -> int:
    """The largest divisor of T at most c (at least 1)."""
    return next(d for d in range(max(min(c, t_len), 1), 0, -1) if t_len % d == 0)


def bench(cell: str, shape, blocks, rounds: int) -> list[tuple[str, float, float]]:
    """Rows (label, temp over float32's, time over float32's); the first row is float32's (1, 1)."""
    t, b, n, n1, m = shape
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    runners, temps, losses = {}, {}, {}
    contenders = [("float32, default", None, None)]
    half = bj.RNNSpec(n, (n1,), m, cell=cell, compute_dtype="bfloat16")
    auto = plan.resolve(plan.Options(), half, t, b, jnp.bfloat16, use_cache=False).block
    contenders.append((f"bfloat16, auto (C = {auto})", "bfloat16", None))
    for c in blocks or sorted({_divisor_at_most(t, max(t // k, 1)) for k in (4, 5, 10, 20)}, reverse=True):
        contenders.append((f"bfloat16, C = {c}", "bfloat16", c))
    for label, dtype, c in contenders:
        spec = bj.RNNSpec(n, (n1,), m, cell=cell, compute_dtype=dtype)
        params = bj.init_params(jax.random.key(0), spec)
        fn = lambda p, x, d, spec=spec, c=c: bj.bptt(p, spec, x, d, block_size=c)  # noqa: E731
        compiled, _, temps[label], _ = bptt_speed.compile_jax(fn, params, xs, targets)
        losses[label] = float(compiled(params, xs, targets)[0])
        runners[label] = lambda f=compiled, p=params: bptt_speed._block(f(p, xs, targets))
    ref = contenders[0][0]
    for label in losses:
        if abs(losses[label] - losses[ref]) > 5e-2 * abs(losses[ref]):
            raise AssertionError(f"{cell} {shape} {label}: DIV {losses[label]} against float32's {losses[ref]}")
    med = bptt_speed.round_robin(runners, rounds)
    return [(label, temps[label] / temps[ref], med[label] / med[ref], temps[label], med[label]) for label in runners]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9; quick 1)")
    ap.add_argument("--quick", action="store_true", help="one tiny shape (smoke test)")
    ap.add_argument("--cell", action="append", choices=CELLS, help="the cells (default all)")
    ap.add_argument("--shape", action="append", help="T,B,N,N1,M (default: the two shapes float32 runs whole)")
    ap.add_argument("--blocks", help="C,C,... the bfloat16 blocks (default: T/4, T/5, T/10, T/20 as divisors)")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds: expected a positive number of timed rounds, got {args.rounds}")
    rounds = args.rounds or (1 if args.quick else 9)
    try:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else None
        blocks = [int(v) for v in args.blocks.split(",")] if args.blocks else None
    except ValueError as e:
        ap.error(f"--shape / --blocks: expected comma-separated ints ({e})")
    if shapes is not None and any(len(s) != 5 for s in shapes):
        ap.error("--shape: expected T,B,N,N1,M")
    shapes = shapes or (QUICK_SHAPES if args.quick else SHAPES)
    lines = gate_blocks.header("The time block under bfloat16 compute", "half_blocks.py", argv, rounds)
    lines += [
        "Temp memory and time of each call over float32's default call (the compiled kernel where it "
        "runs) at the same shape; issue 33's target: the bfloat16 default at most 0.6x float32's temp.",
        "",
        "| cell | (T, B, N, N1, M) | call | temp | temp / float32's | ms | time / float32's |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in args.cell or CELLS:
        for shape in shapes:
            for label, temp_x, time_x, temp, ms in bench(cell, shape, blocks, rounds):
                lines.append(
                    f"| {cell} | {shape} | {label} | {temp / 2**20:.3f} MiB | {temp_x:.2f} | {ms * 1e3:.2f} | {time_x:.2f} |"
                )
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
