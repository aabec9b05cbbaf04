"""Largest relative errors of the explicit BPTT against jax.grad over many random problems.

    python tests/helpers/measure_errors.py [--n 200] [--cell elman|gru|lstm]

Draws networks as the property tests do (1-3 layers, every activation, every valid (output
activation, divergence) pair, random weights, lengths including 0 and T, h0) and prints, for
unidirectional and bidirectional stacks, the largest relative error of loss, gradients, dh0 and dxs
in float32 and float64. Used for the figures quoted in the closing notes.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bptt_jax as bj  # noqa: E402
from tests import reference as ref  # noqa: E402


def one(p, block_size=None):
    h0 = p.h0 if p.h0 is not None else ref.zero_h0(p.spec, p.xs.shape[1], p.xs.dtype)
    v, g, aux = bj.bptt(
        p.params,
        p.spec,
        p.xs,
        p.targets,
        weights=p.weights,
        lengths=p.lengths,
        h0=h0,
        block_size=block_size,
        with_dxs=True,
    )
    f = lambda params, h0, xs: bj.loss(params, p.spec, xs, p.targets, weights=p.weights, lengths=p.lengths, h0=h0)
    wv, (wg, wdh0, wdxs) = jax.value_and_grad(f, argnums=(0, 1, 2))(p.params, h0, p.xs)
    return ref.max_rel_err((v, g, aux.dh0, aux.dxs), (wv, wg, wdh0, wdxs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--cell", default="elman", choices=("elman", "gru", "lstm"))
    args = ap.parse_args()
    rng = np.random.RandomState(123)
    worst = {}
    for i in range(args.n):
        bidir = bool(i % 2)
        spec = bj.RNNSpec(
            int(rng.randint(1, 5)),
            tuple(int(rng.randint(1, 6)) for _ in range(rng.randint(1, 4))),
            int(rng.randint(1, 5)),
            activation=ref.ACTIVATIONS[rng.randint(4)] if args.cell == "elman" else "tanh",
            output_activation=ref.VALID_PAIRS[i % 6][0],
            divergence=ref.VALID_PAIRS[i % 6][1],
            bidirectional=bidir,
            merge=("concat", "sum")[rng.randint(2)],
            cell=args.cell,
        )
        p = ref.make_problem(
            spec,
            int(rng.randint(1, 9)),
            int(rng.randint(1, 4)),
            int(rng.randint(2**31)),
            use_lengths=True,
            use_weights=bool(rng.randint(2)),
            use_h0=bool(rng.randint(2)),
            int_targets=bool(rng.randint(2)),
        )
        for dtype in (jnp.float32, jnp.float64):
            with jax.enable_x64(dtype == jnp.float64):
                jax.clear_caches()  # many shapes: keep the compiled executables from piling up
                block = int(rng.randint(1, p.xs.shape[0] + 2))  # 1 .. T+1, often not dividing T
                err = one(ref.cast(p, dtype), block)
            key = ("bidirectional" if bidir else "unidirectional", jnp.dtype(dtype).name)
            worst[key] = max(worst.get(key, 0.0), err)
    for (kind, dt), e in sorted(worst.items()):
        print(f"{args.cell} {kind:15s} {dt}: largest relative error {e:.2e} over {args.n // 2} problems (with lengths)")


if __name__ == "__main__":
    main()
