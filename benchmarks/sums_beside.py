"""The kernel's weight-gradient sums beside its steps, against XLA's dots after them: bptt side by side.

    python benchmarks/sums_beside.py [--cell elman|gru|lstm ...] [--quick] [--rounds R] [--out FILE]

For each cell at its benchmark shapes (``bptt_speed.SHAPES`` for the Elman cell, ``GATED_SHAPES``
for the gated ones; one layer, softmax + cross-entropy, float32, full lengths), in one process,
round robin in a fresh random order each round, medians (ms):

  sums beside   ``bptt`` with recurrence="native", the whole sequence as one block (gates kept): the
                reverse call sums the weight gradients (and makes dX) on its helper thread where
                ``native.sums_in_kernel`` holds for the block;
  XLA dots      the same program traced with ``native.KERNEL_SUM_ROWS`` out of reach: the reverse
                call returns dA and XLA's dots sum after it (the rule before the sums moved);
  scans         ``bptt`` with recurrence="scan", the whole sequence as one block;
  best grad     the fastest ``jax.grad`` contender of ``bptt_speed.py`` (Elman) / ``gated.py``.

Gradients are checked against the scans' before timing. Where the rule does not put the sums in
the kernel at a shape, the first two are one program and the table says so.
"""

from __future__ import annotations

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
from bptt_jax.core import native  # noqa: E402

CELLS = ("elman", "gru", "lstm")
QUICK_SHAPES = [(130, 8, 4, 8, 4)]  # C B = 1040 rows: the sums in the kernel


def contenders(cell: str, shape) -> tuple[dict, bool]:
    """({name: () -> output}, whether the sums run in the kernel at this shape)."""
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    d = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    gates = {} if cell == "elman" else {"gates": "store"}

    def ours(rec, unroll):  # unroll (which the kernel ignores) keeps the two traces apart in bptt's cache
        f = jax.jit(lambda p, x, y: bj.bptt(p, spec, x, y, block_size=t, recurrence=rec, unroll=unroll, **gates))
        jax.block_until_ready(f(params, xs, d))  # traced now, under the rule in force
        return f

    beside = native.sums_in_kernel(cell, t * b, b, n1, True)
    runs = {"sums beside": ours("native", 1)}
    kept = native.KERNEL_SUM_ROWS
    native.KERNEL_SUM_ROWS = 1 << 62
    try:
        runs["XLA dots"] = ours("native", 2)
    finally:
        native.KERNEL_SUM_ROWS = kept
    runs["scans"] = ours("scan", 1)
    grads = gated.jax_contenders(cell, spec) if cell != "elman" else bptt_speed.jax_contenders(spec)
    for k, g in grads.items():
        if k.startswith("grad("):
            runs[k] = jax.jit(g)
    outs = {k: f(params, xs, d) for k, f in runs.items()}
    want = outs["scans"][1]
    for k in ("sums beside", "XLA dots"):
        err = max(
            float(jnp.max(jnp.abs(a - w)) / (jnp.max(jnp.abs(w)) + 1e-30))
            for a, w in zip(jax.tree.leaves(outs[k][1]), jax.tree.leaves(want), strict=True)
        )
        if err > 1e-3:
            raise AssertionError(f"{cell} {shape} {k}: gradients off the scans' by {err:.2e}")
    return {k: (lambda f=f: bptt_speed._block(f(params, xs, d))) for k, f in runs.items()}, beside


def main(argv=None) -> str:
    args, rounds = gate_blocks.parse_report_args(__doc__, argv, CELLS, 9)
    title = "The kernel's weight-gradient sums beside its steps, against XLA's dots after them"
    lines = gate_blocks.header(title, "sums_beside.py", argv, rounds, " (ms)")
    why = native.unavailable()
    if why is not None:
        lines.append(f"Not run: {why}.")
        return bptt_speed._report(lines, args.out)
    lines += [
        "| cell | (T, B, N, N1, M) | sums beside | XLA dots | scans | best grad | beside over dots "
        "| beside over best grad | sums in the kernel here |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in args.cell or CELLS:
        shapes = QUICK_SHAPES if args.quick else (bptt_speed.SHAPES if cell == "elman" else bptt_speed.GATED_SHAPES)
        for shape in shapes:
            runs, beside = contenders(cell, shape)
            med = bptt_speed.round_robin(runs, rounds)
            best = min(v for k, v in med.items() if k.startswith("grad("))
            s, x = med["sums beside"], med["XLA dots"]
            lines.append(
                f"| {cell} | {shape} | {s * 1e3:.2f} | {x * 1e3:.2f} "
                f"| {med['scans'] * 1e3:.2f} | {best * 1e3:.2f} | {x / s:.2f}x | {best / s:.2f}x "
                f"| {'yes' if beside else 'no (one program)'} |"
            )
            print(lines[-1], flush=True)
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
