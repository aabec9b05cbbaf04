"""The GRU kernel's two gate caches in the whole ``bptt`` call: V_n kept, or formed again.

    python benchmarks/gru_vn.py [--quick] [--rounds R] [--out FILE]

The GRU kernel's forward call keeps per step [r | z | n] (3 N1, "lean": its reverse call forms
V_n = h(t-1) W_hn + b_hn again, a chunk of steps in one matmul) or [r | z | n | V_n] (4 N1);
``native.gru_keeps_vn`` keeps V_n where the reverse call's per-step matmul runs on two threads.
At ``bptt_speed.GATED_SHAPES`` (one layer, softmax + cross-entropy, float32, full lengths, the
default plan: recurrence="native", the gates kept), side by side in one process, round robin in a
fresh random order each round, medians (ms):

  rule      ``bptt`` as the library runs it;
  V_n kept  the same program traced with ``native.gru_keeps_vn`` answering True;
  lean      ... answering False;
  best grad the fastest ``jax.grad`` contender of ``gated.py``.

With each, the compiled program's temp memory. Gradients are checked against the scans' (and the
two caches' against each other) before timing.
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

QUICK_SHAPES = [(6, 64, 4, 210, 4)]  # B 3 N1 N1 > 2^23: two threads, the rule keeps V_n


def contenders(shape) -> tuple[dict, dict]:
    """({name: () -> output}, {name: temp bytes})."""
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell="gru")
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    d = jax.random.randint(jax.random.key(2), (t, b), 0, m)

    def ours(keep, unroll):  # unroll (which the kernel ignores) keeps the traces apart in bptt's cache
        rule = native.gru_keeps_vn
        if keep is not None:
            native.gru_keeps_vn = lambda batch, n1: keep
        try:
            fn = lambda p, x, y: bj.bptt(p, spec, x, y, recurrence="native", unroll=unroll)  # noqa: E731
            compiled, _, temp, _ = bptt_speed.compile_jax(fn, params, xs, d)
        finally:
            native.gru_keeps_vn = rule
        return compiled, temp

    runs, temps = {}, {}
    for name, keep, unroll in (("rule", None, 1), ("V_n kept", True, 2), ("lean", False, 3)):
        runs[name], temps[name] = ours(keep, unroll)
    runs["scans"] = jax.jit(lambda p, x, y: bj.bptt(p, spec, x, y, recurrence="scan"))
    grads = {k: g for k, g in gated.jax_contenders("gru", spec).items() if k.startswith("grad(")}
    for k, g in grads.items():
        runs[k], _, temps[k], _ = bptt_speed.compile_jax(g, params, xs, d)
    outs = {k: f(params, xs, d) for k, f in runs.items()}
    for k in ("rule", "V_n kept", "lean"):
        err = bptt_speed.max_rel_err(outs[k][:2], outs["scans"][:2])
        if err > 1e-3:
            raise AssertionError(f"gru {shape} {k}: gradients off the scans' by {err:.2e}")
    if bptt_speed.max_rel_err(outs["V_n kept"][:2], outs["lean"][:2]) > 1e-5:
        raise AssertionError(f"gru {shape}: the two caches' gradients differ")
    del runs["scans"]
    return {k: (lambda f=f: bptt_speed._block(f(params, xs, d))) for k, f in runs.items()}, temps


def main(argv=None) -> str:
    args, rounds = gate_blocks.parse_report_args(__doc__, argv, ("gru",), 9)
    title = "The GRU kernel's gate cache in the whole bptt call: V_n kept or formed again"
    lines = gate_blocks.header(title, "gru_vn.py", argv, rounds, " (ms; temp MiB)")
    if (why := native.unavailable()) is not None:
        return bptt_speed._report([*lines, f"Not run: {why}."], args.out)
    lines += [
        "| (T, B, N, N1, M) | threads per step | rule keeps V_n | V_n kept | lean | best grad "
        "| kept over lean: time | temp | kept over best grad | lean over best grad |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES:
        runs, temps = contenders(shape)
        med = bptt_speed.round_robin(runs, rounds)
        best_k = min((k for k in med if k.startswith("grad(")), key=lambda k: med[k])
        best, kept, lean = med[best_k], med["V_n kept"], med["lean"]
        _, b, _, n1, _ = shape
        mib = {k: f"{v / 2**20:.1f}" for k, v in temps.items()}
        lines.append(
            f"| {shape} | {'one' if native.one_thread('gru', b, n1) else 'two'} "
            f"| {'yes' if native.gru_keeps_vn(b, n1) else 'no'} | {kept * 1e3:.2f} ({mib['V_n kept']}) "
            f"| {lean * 1e3:.2f} ({mib['lean']}) | {best * 1e3:.2f} ({mib[best_k]}) | {lean / kept:.3f}x "
            f"| {temps['V_n kept'] / max(temps['lean'], 1):.2f}x | {best / kept:.2f}x | {best / lean:.2f}x |"
        )
        print(lines[-1], flush=True)
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
