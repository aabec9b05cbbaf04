"""Both directions of a bidirectional layer in one batched scan, against the library's two scans.

    python benchmarks/bidir_batched.py [--quick] [--rounds R] [--out FILE] [--cell elman|gru|lstm ...]

Issue 35's first lever, second half: "both directions of a bidirectional layer in one batched
matmul". One bidirectional layer at the gated benchmark shapes (float32, every sequence full length,
the time block of the rules), its forward pass and its explicit BPTT (``backward.layer_backward_blocked``
with a given gradient from above), computed two ways:

  two scans     the library's: the forward net's scan, then the reverse net's (over the reversed
                sequence), each with its own [B, N1] x [N1, G N1] matmuls per step;
  one scan      the two directions stacked (weights [2, ...], inputs [2, T, B, N]) and ``jax.vmap``
                over that axis: one loop whose every step runs batched matmuls [2, B, N1] x
                [2, N1, G N1] for both directions.

Both checked equal (1e-5 relative) before timing; compiled programs timed side by side in one
process (round robin, random order, medians). Reported: one scan's time over two scans' (below 1:
batching is faster).
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

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import backward, forward, plan  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]


def contenders(cell: str, shape):
    """{name: (function, args)} for the two ways, forward pass and explicit BPTT together."""
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell, bidirectional=True)
    params = bj.init_params(jax.random.key(0), spec)
    lf, lr = params.layers[0], params.reverse_layers[0]
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    above = jax.random.normal(jax.random.key(2), (t, b, n1), jnp.float32)  # dDIV/dh(t) from above
    width = n1 * (2 if cell == "lstm" else 1)
    h0 = jnp.zeros((b, width), jnp.float32)
    c = plan.auto_block_size(t, b, plan.block_width(spec))
    c = c if t % c == 0 else t
    p = plan.Plan(block=c, store=False, segment=None, unroll=1, recurrence="scan", with_dxs=True)

    def one_direction(layer, x, dh_above):
        hs = forward.unroll_layer(layer, "tanh", x, h0, None, block_size=c)
        grads, dh0, dxs, _ = backward.layer_backward_blocked(layer, "tanh", x, hs, h0, dh_above, None, p)
        return hs, grads, dh0, dxs

    def two_scans(lf, lr, xs, above):
        fwd = one_direction(lf, xs, above)
        rev = one_direction(lr, xs[::-1], above[::-1])  # full lengths: reverse_padded is a flip
        return jax.tree.map(lambda a, r: jnp.stack([a, r]), fwd, rev)

    def one_scan(lf, lr, xs, above):
        layers = jax.tree.map(lambda a, r: jnp.stack([a, r]), lf, lr)
        return jax.vmap(one_direction)(layers, jnp.stack([xs, xs[::-1]]), jnp.stack([above, above[::-1]]))

    args = (lf, lr, xs, above)
    return {"two scans": (two_scans, args), "one scan": (one_scan, args)}, c


def main(argv=None) -> str:
    args, rounds = gate_blocks.parse_report_args(__doc__, argv, bptt_speed.CELLS, 11)
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES
    lines = gate_blocks.header(
        "Bidirectional layer: both directions in one batched scan", "bidir_batched.py", argv, rounds
    )
    lines += [
        "One bidirectional layer, forward pass + explicit BPTT; ms per call (median) and one scan over two scans.",
        "",
        "| cell | T, B, N, N1 | block C | two scans ms | one scan ms | one / two |",
        "|---|---|---|---|---|---|",
    ]
    for cell in args.cell or bptt_speed.CELLS:
        for shape in shapes:
            fns, c = contenders(cell, shape)
            compiled = {k: jax.jit(f).lower(*a).compile() for k, (f, a) in fns.items()}
            outs = {k: compiled[k](*fns[k][1]) for k in fns}
            err = bptt_speed.max_rel_err(outs["one scan"], outs["two scans"])
            if err > 1e-5:
                raise AssertionError(f"{cell} {shape}: the two ways differ ({err:.2e})")
            runners = {k: (lambda f=compiled[k], a=fns[k][1]: bptt_speed._block(f(*a))) for k in fns}
            med = bptt_speed.round_robin(runners, rounds)
            two, one = med["two scans"], med["one scan"]
            lines.append(f"| {cell} | {shape[:4]} | {c} | {1e3 * two:.2f} | {1e3 * one:.2f} | {one / two:.2f} |")
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
