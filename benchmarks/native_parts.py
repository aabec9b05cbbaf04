"""Where one gated layer's time goes with the compiled kernel, beside PyTorch's fused layer.

    python benchmarks/native_parts.py [--cell lstm|gru] [--no-torch] [--quick] [--rounds R] [--out FILE]
                                      [--shape T,B,N,N1 ...]

For each gated cell at ``bptt_speed.GATED_SHAPES`` (or the ``--shape`` given: the training configs'
two layers are 64,32,103,256 and 64,32,256,256) (one layer, float32, full lengths), side by side
in one process (round robin, a fresh random order each round, medians), in ms:

  layer scans      ``jax.vjp`` of ``rnn_states`` (the custom VJP: one forward + explicit BPTT, dX
                   included) with the scans, for a random cotangent of the states;
  layer kernel     the same with recurrence="native";
  kernel forward   the kernel's forward loop alone (``native.forward``: it forms X Wx + bx itself, for
                   all T in one matmul), keeping the gate cache (the GRU's lean [C, B, 3 N1], also
                   where ``native.gru_keeps_vn`` would keep V_n), and
  ... no cache     keeping one step's scratch only (X(t) Wx step by step; with the kept run, what the
                   fresh pages of a [T, B, 4 N1] cache cost);
  kernel reverse   the kernel's reverse call (``native.reverse``: the recursion, with the weight
                   gradients the kernel sums where ``native.sums_in_kernel`` says, as the library
                   calls it (the GRU's dWh as it walks the steps, the LSTM's dWx and dWh on a
                   helper thread), and XLA's dots for the rest);
  ... dX           the reverse call as the layer runs it for a layer above the first
                   (``native.reverse_dx``, where ``native.dx_in_kernel`` says: dX = dA Wx^T made on the
                   helper thread too; "-" where it does not apply);
  ... recursion    the reverse call without any sums (``native.reverse_d``: the recursion alone,
                   dA returned; what the call's steps cost before the sums beside them);
  GRU, V_n kept    the GRU's forward call keeping V_n = h(t-1) W_hn + b_hn in its cache ([C, B, 4 N1],
                   ``native.forward(..., keep_vn=True)``), then its reverse call (and the one with dX)
                   reading it: what the kernel did before it formed V_n again in the reverse call
                   (a chunk of steps in one matmul; the cache [C, B, 3 N1]), as it still does where
                   ``native.gru_keeps_vn`` says so; "-" for the LSTM;
  projection       X Wx + bx over the whole sequence by XLA's dot (for comparison: the kernel's forward
                   forms it itself);
  weight grads, dX the backward's bulk matmuls as XLA's dots, for comparison: dWx = X^T dA, dWh =
                   h^T dV (dV taken as dA for the GRU: the same shapes), dX = dA Wx^T;
  torch            PyTorch's ``nn.LSTM`` / ``nn.GRU`` forward + ``backward`` of the same cotangent
                   (oneDNN, eager, two threads; where torch imports and without --no-torch).

A second table gives, for the same calls, the processor time per call over the wall time (every
thread of the process, ``time.process_time``): how many of the cores a part kept busy (2.0: both
for the whole call).

The parts do not add up to the layer exactly (the layer also shifts and joins states, and XLA may
run independent parts side by side), but they show which part a faster layer must shrink. The
environment variables that change where memory comes from (``MALLOC_*``) are printed with the
command: fresh pages of large buffers cost page faults on every call.
"""

from __future__ import annotations

import os
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
from bptt_jax.core import cells, native  # noqa: E402
from bptt_jax.core.vjp import rnn_states  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]
GATED = ("lstm", "gru")


def runners(cell: str, shape, threads: int) -> dict:
    """{part: a function that runs it once and blocks, or None where the part does not apply}."""
    t, b, n, n1, _ = shape
    mod = cells.get(cell)
    spec = bj.RNNSpec(n, (n1,), n1, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    layer = params.layers[0]
    k = jax.random.split(jax.random.key(1), 3)
    xs = jax.random.normal(k[0], (t, b, n), jnp.float32)
    ct = jax.random.normal(k[1], (t, b, n1), jnp.float32)
    s0 = jnp.zeros((b, mod.state_width(n1)), jnp.float32)

    def layer_vjp(recurrence):
        def run(p, x):
            _, back = jax.vjp(lambda p, x: rnn_states(p, spec, x, recurrence=recurrence), p, x)
            return back(ct)

        return jax.jit(run)

    project = jax.jit(lambda x: mod.project(layer, x))
    fwd = {  # the GRU's lean cache [r | z | n] here (native.gru_keeps_vn keeps V_n where two threads run a step)
        keep: jax.jit(lambda x, keep=keep: native.forward(cell, layer, x, s0, None, keep, keep_vn=False))
        for keep in (True, False)
    }
    ss, cache = fwd[True](xs)
    gru = cell == "gru"
    fwd_vn = jax.jit(lambda x: native.forward(cell, layer, x, s0, None, True, keep_vn=True))
    cache_vn = fwd_vn(xs)[1] if gru else None
    prev = jnp.concatenate([s0[None], ss[:-1]], axis=0)
    inside = native.sums_in_kernel(cell, t * b, b, n1, True)  # as backward.cell_backward decides
    rev = jax.jit(lambda c, g, s: native.reverse(cell, layer, xs, c, g, s0, s, None, None, sum_in_kernel=inside))
    _, _, das, _ = rev(ct, cache, ss)
    with_dx = jax.jit(lambda c, g, s: native.reverse_dx(cell, layer, xs, c, g, s0, s, None, None))
    dx_applies = native.dx_in_kernel(cell, t * b, b, n1, True)
    bh = layer.bh if gru else None
    recursion = jax.jit(lambda c, g, s: native.reverse_d(cell, layer.wh, c, g, s0, s, None, None, bh=bh))
    bulk = jax.jit(lambda x, pv, da: (mod.weight_grads(layer, x, pv, da, da), mod.input_grad(layer, da)))
    scans, kernel = layer_vjp("scan"), layer_vjp("native")
    out = {
        "layer scans": lambda: jax.block_until_ready(scans(params, xs)),
        "layer kernel": lambda: jax.block_until_ready(kernel(params, xs)),
        "kernel forward": lambda: jax.block_until_ready(fwd[True](xs)),
        "... no cache": lambda: jax.block_until_ready(fwd[False](xs)),
        "kernel reverse": lambda: jax.block_until_ready(rev(ct, cache, ss)),
        "... dX": (lambda: jax.block_until_ready(with_dx(ct, cache, ss))) if dx_applies else None,
        "... recursion": lambda: jax.block_until_ready(recursion(ct, cache, ss)),
        "GRU, V_n kept: forward": (lambda: jax.block_until_ready(fwd_vn(xs))) if gru else None,
        "... reverse": (lambda: jax.block_until_ready(rev(ct, cache_vn, ss))) if gru else None,
        "... dX ": (lambda: jax.block_until_ready(with_dx(ct, cache_vn, ss))) if gru and dx_applies else None,
        "projection": lambda: jax.block_until_ready(project(xs)),
        "weight grads, dX": lambda: jax.block_until_ready(bulk(xs, prev, das)),
    }
    if threads:
        try:
            import torch
        except Exception:
            return out
        torch.set_num_threads(threads)
        rnn = getattr(torch.nn, {"lstm": "LSTM", "gru": "GRU"}[cell])(n, n1)
        tx = torch.randn(t, b, n, requires_grad=True)
        tct = torch.randn(t, b, n1)

        def torch_run():
            y, _ = rnn(tx)
            y.backward(tct)

        out["torch"] = torch_run
    return out


def _no_torch(ap) -> None:
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    ap.add_argument("--shape", action="append", help="T,B,N,N1 (repeatable): these shapes instead")


def main(argv=None) -> str:
    args, rounds = gate_blocks.parse_report_args(__doc__, argv, GATED, 9, extra=_no_torch)
    lines = gate_blocks.header("Where a gated layer's time goes with the kernel", "native_parts.py", argv, rounds)
    why = native.unavailable()
    if why is not None:
        lines.append(f"Not run: {why}.")
        return bptt_speed._report(lines, args.out)
    threads = 0 if args.no_torch else os.cpu_count() or 1
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES
    if args.shape:
        shapes = [(*(int(v) for v in s.split(",")), 1) for s in args.shape]
    for cell in args.cell or GATED:
        table, busy = None, None
        for shape in shapes:
            parts = runners(cell, shape, threads)
            cpu: dict = {}
            med = bptt_speed.round_robin({k: f for k, f in parts.items() if f is not None}, rounds, cpu=cpu)
            if table is None:
                names = list(parts)
                head = "| (T, B, N, N1) | " + " | ".join(names) + " |"
                table = [f"## {cell.upper()} (ms, medians)", "", head, "|---" * (len(names) + 1) + "|"]
                busy = [f"### {cell.upper()}: cores busy (processor time / wall time)", "", head, table[-1]]
            table.append(f"| {shape[:4]} | " + " | ".join(_cell(med, k, 1e3) for k in names) + " |")
            busy.append(
                f"| {shape[:4]} | " + " | ".join(_cell({k: cpu[k] / med[k] for k in med}, k, 1) for k in names) + " |"
            )
        lines += [*(table or []), "", *(busy or []), ""]
    return bptt_speed._report(lines, args.out)


def _cell(values: dict, key: str, scale: float) -> str:
    return f"{values[key] * scale:.2f}" if key in values else "-"


if __name__ == "__main__":
    main()
