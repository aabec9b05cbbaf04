"""Checkpoint segments of a gated cell: the segment's gates kept for its BPTT, or recomputed again.

    python benchmarks/segment_gates.py [--quick] [--rounds R] [--out FILE] [--cell gru|lstm ...]

Inside a unidirectional stack's segments (``segments.stack_backward_segments``) the forward scans
over the segment being differentiated keep the gates where the rules would for a run of k steps
(``plan.resolve_gates("auto", ...)``), so the blocked BPTT over the segment reads them instead of
recomputing them. This script races that against the segments as they ran before (the gates
recomputed in the BPTT): ``bptt``'s body with segments compiled twice in one process (each a jit of
its own, so each is traced anew), once with the rule replaced by "recompute" while it is traced,
beside the default call (no segments). One unidirectional layer, B 16, N 64,
N1 128, M 64, float32; one level of segments and two nested levels. Every gradient is checked
against the default's first. Reported: temp memory (XLA's ``memory_analysis()``) and median time of
each, and kept / recomputed.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402

import bptt_jax as bj  # noqa: E402
from bptt_jax.core import budget, gradient, plan, segments  # noqa: E402

SIZES = dict(B=16, N=64, N1=128, M=64)
CASES = ((1000, 25), (10000, 100), (10000, (500, 20)))  # (T, checkpoint_every)
QUICK = dict(B=2, N=3, N1=4, M=3)
QUICK_CASES = ((12, 4), (12, (6, 3)))


def _compiled(spec, params, xs, targets, every, rule):
    """``bptt``'s body with ``checkpoint_every=every``, traced (a new jit: no cache shared) and
    compiled with ``segments.resolve_gates`` = ``rule``."""
    body = functools.partial(gradient._bptt, spec=spec, options=plan.Options(checkpoint_every=every))
    original = segments.resolve_gates
    segments.resolve_gates = rule
    try:
        fn = jax.jit(lambda p, x, d: body(p, x, d, None, None, None, None)[:2])
        return fn.lower(params, xs, targets).compile()
    finally:
        segments.resolve_gates = original


def bench(cell: str, t_len: int, every, sizes: dict, rounds: int) -> dict:
    """{contender: (temp bytes, median s, largest rel. difference from the default's gradients)}."""
    spec = bj.RNNSpec(sizes["N"], (sizes["N1"],), sizes["M"], cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t_len, sizes["B"], sizes["N"]))
    targets = jax.random.randint(jax.random.key(2), (t_len, sizes["B"]), 0, sizes["M"])
    programs = {
        "segments, gates kept": _compiled(spec, params, xs, targets, every, segments.resolve_gates),
        "segments, gates recomputed": _compiled(spec, params, xs, targets, every, lambda *a, **k: False),
        "default (no segments)": jax.jit(lambda p, x, d: bj.bptt(p, spec, x, d)[:2])
        .lower(params, xs, targets)
        .compile(),
    }
    ref = programs["default (no segments)"](params, xs, targets)
    errs = {k: bptt_speed.max_rel_err(c(params, xs, targets), ref) for k, c in programs.items()}
    runners = {k: (lambda c=c: bptt_speed._block(c(params, xs, targets))) for k, c in programs.items()}
    med = bptt_speed.round_robin(runners, rounds)
    return {k: (budget.temp_bytes(c), med[k], errs[k]) for k, c in programs.items()}


def main(argv=None) -> str:
    args, rounds = gate_blocks.parse_report_args(__doc__, argv, ("gru", "lstm"), 7)
    sizes, cases = (QUICK, QUICK_CASES) if args.quick else (SIZES, CASES)
    lines = gate_blocks.header("Segments of gated cells: gates kept or recomputed", "segment_gates.py", argv, rounds)
    lines += [
        f"One layer, B {sizes['B']}, N {sizes['N']}, N1 {sizes['N1']}, M {sizes['M']}, float32. kept / recomputed: "
        "the time of the segments that keep the gates over the time of those that recompute them (below 1: faster).",
        "",
        "| cell | T | checkpoint_every | contender | temp | ms | kept / recomputed | max rel err vs default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in args.cell or ("gru", "lstm"):
        for t_len, every in cases:
            res = bench(cell, t_len, every, sizes, rounds)
            ratio = res["segments, gates kept"][1] / res["segments, gates recomputed"][1]
            for name, (temp, sec, err) in res.items():
                r = f"{ratio:.3f}" if name == "segments, gates kept" else ""
                row = f"| {cell} | {t_len} | {every} | {name} | {budget.format_bytes(temp)} | {sec * 1e3:.2f} | {r} | {err:.1e} |"
                lines.append(row)
                print(row, flush=True)
    report = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(report, encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
