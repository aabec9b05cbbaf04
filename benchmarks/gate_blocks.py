"""The gated cells' forward scan: A(t) as one [T, B, G N1] array, or one array per gate block.

    python benchmarks/gate_blocks.py [--rounds R] [--quick] [--out FILE] [--no-sweep]

``forward.unroll_layer`` hands a gated cell's hoisted projection A(t) = X(t) Wx + bx to its ``lax.scan``
as G arrays [T, B, N1] (one per gate block) and joins them inside the step. This script measures
why, side by side in one process: the same scan of ``cell.recur`` (h only) and ``cell.recur_cache``
(h and the gate cache, gates="store"), fed A(t) either way, for GRU and LSTM at the benchmark shapes
(one layer; T, B, N1). It checks that both formulations give the same states before timing, and
also times the library's forward-only ``bptt_jax.loss`` (one layer + readout) for reference.

Then the sweep behind ``plan.STORE_ELEMENTS``: ``bptt(..., gates="store")`` against
``gates="recompute"`` (forward + loss + gradients, one layer + softmax readout, T = 50, N = M = N1 / 2)
from one example up, where a step's fixed costs dominate, with the cache's size in elements.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import cells  # noqa: E402

SHAPES = [(50, 1, 64), (100, 32, 128), (200, 64, 256), (1000, 16, 128), (100, 64, 512), (64, 32, 256)]
QUICK_SHAPES = [(12, 3, 6)]
SWEEP = [(50, b, 64) for b in (1, 2, 4, 8, 16, 32)] + [(50, 1, 128), (50, 1, 256), (200, 1, 64), (200, 4, 128)]
QUICK_SWEEP = [(12, 3, 6)]


def scans(cell_name: str, store: bool):
    """{"one array": f, "per gate block": f}, each f(layer, us, s0) -> states (and caches)."""
    cell = cells.get(cell_name)

    def step(layer, s, u_t):
        if store:
            s, cache = cell.recur_cache(layer, "tanh", s, u_t)
            return s, (s, cache)
        s = cell.recur(layer, "tanh", s, u_t)
        return s, s

    def one_array(layer, us, s0):
        return lax.scan(lambda s, u_t: step(layer, s, u_t), s0, us)[1]

    def per_gate(layer, us, s0):
        n1 = us.shape[-1] // cell.GATES
        parts = tuple(us[..., k * n1 : (k + 1) * n1] for k in range(cell.GATES))
        return lax.scan(lambda s, u: step(layer, s, jnp.concatenate(u, -1)), s0, parts)[1]

    return {"one array": jax.jit(one_array), "per gate block": jax.jit(per_gate)}


def bench(cell_name, shape, rounds):
    t, b, n1 = shape
    spec = bj.RNNSpec(input_size=n1, hidden_sizes=(n1,), output_size=n1, cell=cell_name)
    params = bj.init_params(jax.random.key(0), spec)
    layer = params.layers[0]
    xs = jax.random.normal(jax.random.key(1), (t, b, n1))
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, n1)
    cell = cells.get(cell_name)
    us = cell.project(layer, xs)
    s0 = jnp.zeros((b, cell.state_width(n1)))
    runs, args = {}, {}
    for store in (False, True):
        fns = scans(cell_name, store)
        ref = fns["one array"](layer, us, s0)
        got = fns["per gate block"](layer, us, s0)
        err = _max_diff(ref, got)
        if err > 1e-5:
            raise AssertionError(f"{cell_name} {shape} store={store}: the two formulations differ by {err}")
        for name, f in fns.items():
            key = f"{'recur_cache' if store else 'recur'}, {name}"
            runs[key], args[key] = f, (layer, us, s0)
    runs["bptt_jax.loss (1 layer + readout)"] = jax.jit(lambda p, x, d: bj.loss(p, spec, x, d))
    args["bptt_jax.loss (1 layer + readout)"] = (params, xs, targets)
    for k, f in runs.items():
        jax.block_until_ready(f(*args[k]))
    return _medians(runs, args, rounds)


def _medians(runs, args, rounds):
    """Median ms of each runs[k](*args[k]) over ``rounds`` rounds, a fresh random order each round."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        order = list(runs)
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            jax.block_until_ready(runs[k](*args[k]))
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def bench_gates(cell_name, shape, rounds):
    """Medians (ms) of bptt with gates="store" and "recompute", and the cache's elements."""
    t, b, n1 = shape
    n = max(n1 // 2, 1)
    spec = bj.RNNSpec(input_size=n, hidden_sizes=(n1,), output_size=n, cell=cell_name)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n))
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, n)
    runs = {
        g: jax.jit(lambda p, x, d, g=g: bj.bptt(p, spec, x, d, gates=g, recurrence="scan")[:2])
        for g in ("store", "recompute")
    }
    out = {g: f(params, xs, targets) for g, f in runs.items()}
    err = _max_diff(out["store"], out["recompute"])
    if err > 1e-3:
        raise AssertionError(f"{cell_name} {shape}: stored and recomputed gates differ by {err}")
    med = _medians(runs, {g: (params, xs, targets) for g in runs}, rounds)
    return med, t * b * cells.get(cell_name).CACHE * n1


def cpu_model() -> str:
    """The CPU as the plan cache keys it (``bptt_jax.core.plancache.describe_host``): its model
    with family and model numbers, its vector extensions (AVX2 or AVX-512 ...) and logical cores."""
    from bptt_jax.core import plancache

    return plancache.describe_host()


def parse_report_args(doc: str, argv, cells, default_rounds: int, extra=None):
    """The options of a report script (--rounds, --quick, --out, --cell): (args, rounds), rounds
    being --rounds, else 1 with --quick, else ``default_rounds``; a non-positive --rounds is refused.
    ``extra(ap)``, when given, adds the script's own options to the parser."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra is not None:
        extra(ap)
    ap.add_argument("--rounds", type=int, default=None, help=f"timed rounds (default {default_rounds}; quick 1)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--cell", action="append", choices=cells, help="cells (default: all)")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds: expected a positive number of timed rounds, got {args.rounds}")
    return args, args.rounds or (1 if args.quick else default_rounds)


ENV_SHOWN = ("MALLOC_", "XLA_FLAGS", "OMP_")  # settings that change the timings, printed in the command


def header(title: str, script: str, argv, rounds: int, unit: str = "") -> list[str]:
    """A report's first lines: title and date, then machine (CPU model), jax, the command line and the rounds."""
    cmd = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(ENV_SHOWN))
    cmd = f"{env} {cmd}" if env else cmd
    return [
        f"# {title} ({datetime.date.today()})",
        "",
        f"Machine: {cpu_model()} ({platform.machine()}), {jax.device_count()} x {jax.default_backend()}, jax {jax.__version__}, "
        f"python {platform.python_version()}; command: `{cmd.strip()}`; {rounds} rounds, random order, medians{unit}.",
        "",
    ]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 21; quick 2)")
    ap.add_argument("--quick", action="store_true", help="one tiny shape (smoke test)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--no-sweep", action="store_true", help="leave out the store-vs-recompute sweep")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds: expected a positive number of timed rounds, got {args.rounds}")
    rounds = args.rounds or (2 if args.quick else 21)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    lines = header("The gated forward scan: one array or one per gate block", "gate_blocks.py", argv, rounds, " (ms)")
    lines += [
        "| cell | T, B, N1 | recur: one array | per gate block | speed-up | recur_cache: one array "
        "| per gate block | speed-up | bptt_jax.loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell_name in ("gru", "lstm"):
        for shape in shapes:
            m = bench(cell_name, shape, rounds)
            r1, r2 = m["recur, one array"], m["recur, per gate block"]
            c1, c2 = m["recur_cache, one array"], m["recur_cache, per gate block"]
            lines.append(
                f"| {cell_name.upper()} | {shape} | {r1:.3f} | {r2:.3f} | {r1 / r2:.2f}x | {c1:.3f} | {c2:.3f} "
                f"| {c1 / c2:.2f}x | {m['bptt_jax.loss (1 layer + readout)']:.3f} |"
            )
            print(lines[-1], flush=True)
    if not args.no_sweep:
        lines += [
            "",
            '## bptt, gates="store" against "recompute" (T, B, N1; N = M = N1 / 2)',
            "",
            "| cell | T, B, N1 | cached elements | store ms | recompute ms | store's speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for cell_name in ("gru", "lstm"):
            for shape in QUICK_SWEEP if args.quick else SWEEP:
                med, elements = bench_gates(cell_name, shape, 2 * rounds)
                lines.append(
                    f"| {cell_name.upper()} | {shape} | {elements:,} | {med['store']:.3f} | {med['recompute']:.3f} "
                    f"| {med['recompute'] / med['store']:.2f}x |"
                )
                print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(report)
    return report


if __name__ == "__main__":
    main()
