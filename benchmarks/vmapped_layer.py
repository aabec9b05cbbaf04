"""One Equinox layer's forward + backward, vmapped over the batch and in one call, side by side.

    python benchmarks/vmapped_layer.py [--cell gru|lstm ...] [--shape T,B,N,N1 ...] [--quick]
                                       [--rounds R] [--out FILE]

``jax.grad`` (weights and inputs) of sum(sin(h(t))) over one ``bptt_jax.layers.equinox.RNN`` made
from the Equinox cell, float32, in one process, round robin in a fresh random order each round,
medians (ms) and compiled temp memory:

  vmapped               ``jax.vmap`` of the one-sequence call (the defaults: under ``jax.grad`` of
                        the vmapped loss, the layer's batch call over the vmapped batch);
  vmapped, per sequence  the same with ``core.sequence._vmap_innermost`` switched off: the layer's
                        one-sequence path (as under ``jax.vmap`` of ``jax.grad``), the kernel's
                        loops once for the vmapped batch, the weight gradients vmap's matmuls;
  vmapped, scans        ``recurrence="scan"``;
  one call              the layer called on the batch [B, T, N] (the kernel's reverse call sums the
                        weight gradients beside its steps where its rule holds);
  one call, XLA's sums  the same traced with ``native.KERNEL_SUM_ROWS`` out of reach (XLA's dots);
  Equinox cell          ``jax.lax.scan`` over the Equinox cell, vmapped (the reference).

Gradients are checked against the Equinox cell's first.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import eqx_speed  # noqa: E402
import gate_blocks  # noqa: E402

from bptt_jax.core import native, sequence  # noqa: E402
from bptt_jax.layers import equinox as beqx  # noqa: E402

SHAPES = ((128, 32, 256, 256), (128, 32, 64, 256))  # (T, B, N, N1): eqx_speed.py's two layers
QUICK_SHAPES = ((6, 3, 4, 5),)


def contenders(cell: str, shape):
    """{name: (jitted grad function, its arguments)}."""
    t, b, n, n1 = shape
    make = {"gru": eqx.nn.GRUCell, "lstm": eqx.nn.LSTMCell}[cell]
    eqx_cell = make(n, n1, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (b, t, n), jnp.float32)
    ours = beqx.RNN.from_eqx_cell(eqx_cell)
    scans = beqx.RNN.from_eqx_cell(eqx_cell, recurrence="scan")

    def grad_of(model, call):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        loss = lambda p, x: jnp.sum(jnp.sin(call(eqx.combine(p, static), x)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, xs)

    vmapped = lambda m, x: jax.vmap(m)(x)  # noqa: E731
    return {
        "vmapped": grad_of(ours, vmapped),
        "vmapped, per sequence": grad_of(ours, vmapped),
        "vmapped, scans": grad_of(scans, vmapped),
        "one call": grad_of(ours, lambda m, x: m(x)),
        "one call, XLA's sums": grad_of(ours, lambda m, x: m(x)),
        "Equinox cell": grad_of(eqx_speed.Scanned(eqx_cell), vmapped),
    }


def _compile(name, fn, args):
    """Traces and compiles ``fn`` with the switch its name asks for."""
    rows, sum_rows = sequence._vmap_innermost, native.KERNEL_SUM_ROWS
    if name == "vmapped, per sequence":
        sequence._vmap_innermost = lambda x: False
    if name == "one call, XLA's sums":
        native.KERNEL_SUM_ROWS = 1 << 60
    try:
        return bptt_speed.compile_jax(fn, *args)
    finally:
        sequence._vmap_innermost, native.KERNEL_SUM_ROWS = rows, sum_rows


def bench(cell: str, shape, rounds: int) -> dict:
    runs = contenders(cell, shape)
    runners, info = {}, {}
    for name, (fn, args) in runs.items():
        compiled, _, temp, _ = _compile(name, fn, args)
        value = compiled(*args)
        info[name] = {"temp": temp, "out": value}
        runners[name] = lambda c=compiled, a=args: bptt_speed._block(c(*a))
    ref = info["Equinox cell"]["out"]
    for name in info:  # the Equinox cell's parameters are laid out as its own: compare the inputs' gradient
        info[name]["err"] = bptt_speed.max_rel_err(info[name].pop("out")[1], ref[1])
    return {"med": bptt_speed.round_robin(runners, rounds), "info": info}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", action="append", choices=("gru", "lstm"), help="default: both")
    ap.add_argument("--shape", action="append", help="T,B,N,N1 (default: eqx_speed.py's two layers)")
    ap.add_argument("--quick", action="store_true", help="a tiny shape (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 15, quick 2)")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in args.shape]
        if args.shape
        else (QUICK_SHAPES if args.quick else SHAPES)
    )
    rounds = args.rounds or (2 if args.quick else 15)
    why = native.unavailable()
    lines = [
        f"# One Equinox layer's forward + backward, vmapped and in one call ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {gate_blocks.cpu_model()}, jax {jax.__version__}, equinox {eqx.__version__}; command: "
        f"`python benchmarks/vmapped_layer.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"{rounds} rounds, a fresh random order each round, medians. "
        + ("The compiled kernel runs." if why is None else f"The compiled kernel cannot run here ({why}): the scans."),
        "",
        "| cell | (T, B, N, N1) | contender | ms | over the Equinox cell | temp mem | max rel err of dX |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in args.cell or ["gru", "lstm"]:
        for shape in shapes:
            r = bench(cell, shape, rounds)
            base = r["med"]["Equinox cell"]
            lines += [
                f"| {cell} | {shape} | {name} | {1e3 * sec:.1f} | {base / sec:.2f}x | "
                f"{r['info'][name]['temp'] / 2**20:.2f} MiB | {r['info'][name]['err']:.1e} |"
                for name, sec in r["med"].items()
            ]
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
