"""The gated cells' memory trade: bptt's settings against the jax.grad contenders' compiled memory.

    python benchmarks/gated_memory.py [--rounds R] [--quick] [--out FILE]

For GRU and LSTM at the gated benchmark shapes (one layer + softmax readout, float32, as
``bptt_speed.py --cell``): the compiled temp memory of every ``jax.grad`` contender of ``gated.py``,
and of ``bptt`` with the gates stored (``gates="auto"``, the default: stored at these shapes),
recomputed, and recomputed in time blocks of 1/2 and 1/4 of the automatic block size; each bptt
setting's median time against the default's, timed side by side in one process (round robin, random
order). Every setting's value and gradients are checked against the default's before timing.

Issue 18's memory target asks for at most 0.4x the smallest ``jax.grad`` contender's temp memory
wherever that needs more than 4 MiB; this is the table behind "where the default sits".
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
import gated  # noqa: E402

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import plan as bptt_plan  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]
TARGET = 0.4  # issue 18: temp memory at most 0.4x the smallest jax.grad contender's
FLOOR = 4 * 2**20  # ... where that contender needs more than 4 MiB


def settings(spec, t: int, b: int) -> dict:
    """{label: bptt keyword arguments}: the default, gates recomputed, and recomputed in smaller blocks."""
    auto = bptt_plan.auto_block_size(t, b, bptt_plan.block_width(spec))
    out = {"bptt (default)": {}, "recompute": {"gates": "recompute"}}
    for k in (2, 4):
        c = max(min(auto, t) // k, 1)
        out[f"recompute, C = {c} (1/{k} of auto {min(auto, t)})"] = {"gates": "recompute", "block_size": c}
    return out


def bench(cell: str, shape, rounds: int):
    """Per shape: the smallest jax.grad temp (bytes, which), and per bptt setting (temp, ms, x default)."""
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    grad_temps = {}
    for name, fn in gated.jax_contenders(cell, spec).items():
        if name.startswith("grad("):
            grad_temps[name] = bptt_speed.compile_jax(fn, params, xs, targets)[2]
    smallest = min(grad_temps, key=grad_temps.get)
    runners, temps, ref = {}, {}, None
    for label, kw in settings(spec, t, b).items():
        fn = lambda p, x, d, kw=kw: bj.bptt(p, spec, x, d, **kw)[:2]
        compiled, _, temp, _ = bptt_speed.compile_jax(fn, params, xs, targets)
        out = compiled(params, xs, targets)
        ref = out if ref is None else ref
        err = bptt_speed.max_rel_err(out, ref)
        if err > 1e-4:
            raise AssertionError(f"{cell} {shape} {label}: differs from the default by {err:.2e}")
        temps[label] = temp
        runners[label] = lambda c=compiled: bptt_speed._block(c(params, xs, targets))
    med = bptt_speed.round_robin(runners, rounds)
    return (grad_temps[smallest], smallest), {k: (temps[k], med[k]) for k in runners}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15; quick 1)")
    ap.add_argument("--quick", action="store_true", help="one tiny shape (smoke test)")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds: expected a positive number of timed rounds, got {args.rounds}")
    rounds = args.rounds or (1 if args.quick else 15)
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES
    lines = gate_blocks.header("Gated cells: bptt's memory settings against jax.grad", "gated_memory.py", argv, rounds)
    lines += [
        "temp / smallest: compiled temp memory over the smallest jax.grad contender's (target <= "
        f"{TARGET}x where that is > 4 MiB; `*` marks a shape below that floor); time: median ms, and the "
        "default's time over this setting's (below 1: slower than the default).",
    ]
    for cell in ("gru", "lstm"):
        lines += [
            "",
            f"## {cell.upper()}",
            "",
            "| T, B, N, N1, M | smallest jax.grad temp (which) | bptt setting | temp | temp / smallest | ms "
            "| default's time / this |",
            "|---|---|---|---|---|---|---|",
        ]
        for shape in shapes:
            (g_temp, g_name), rows = bench(cell, shape, rounds)
            floor = "" if g_temp > FLOOR else " *"
            base_ms = rows["bptt (default)"][1]
            for label, (temp, sec) in rows.items():
                lines.append(
                    f"| {shape}{floor} | {bptt_speed.fmt_bytes(g_temp)} ({g_name}) | {label} "
                    f"| {bptt_speed.fmt_bytes(temp)} | {ratio(temp, g_temp)} | {1e3 * sec:.2f} | {base_ms / sec:.2f}x |"
                )
    return bptt_speed._report(lines, args.out)  # printed, and written to --out


if __name__ == "__main__":
    main()
