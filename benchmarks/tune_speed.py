"""The explicit BPTT before and after ``bptt_jax.tune`` on this machine, beside ``jax.grad``.

    python benchmarks/tune_speed.py [--quick] [--rounds R] [--budget S] [--out FILE] [--cell elman|gru|lstm ...]
    python benchmarks/tune_speed.py --layers [...]   # the layers' plans: rnn_states and tune_states

For each cell and benchmark shape (``bptt_speed.SHAPES`` for the Elman cell, ``GATED_SHAPES`` for
the GRU and LSTM; one layer, softmax + cross-entropy, float32): ``bptt_jax.tune`` runs first (its
time is reported; ``--budget`` seconds at most per shape), in a plan cache of its own (a temporary
``BPTT_JAX_CACHE_DIR``, never the user's); then, in one process and round-robin, the plan the rules
choose (``plan.resolve`` without the cache), the tuned plan, and the ``jax.grad`` contenders of
``bptt_speed.py`` / ``gated.py``, all jitted, gradients checked against the first ``jax.grad``
contender. Reported: each plan's time over the best ``jax.grad`` contender's (speed-up, higher is
better), the tuned plan over the rules' plan, and temp memory. Under ``max_memory`` (a share of the
smallest ``jax.grad`` contender's temp, ``--memory-fraction``): the budgeted call as the rules pick
its plan, and again after ``tune(..., max_memory=...)`` under the same budget. Where tune kept the rules' plan the
two are one program, timed once. Geometric means per cell at the end.

``--layers``: the same for one layer's forward + backward through ``rnn_states`` (what the NNX and
Equinox layers run) at ``nnx_speed.py``'s two layer shapes, ``tune_states`` against the rules'
plan, beside ``grad="autodiff"`` (jax.grad of the same scans).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
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
from bptt_jax.core import gradient, plan, vjp  # noqa: E402

RULES, TUNED, BUDGETED = "bptt, the rules' plan", "bptt, tuned", "bptt, max_memory"
BUDGET_TUNED = "bptt, max_memory, tuned"


def _explicit(p: plan.Plan) -> dict:
    return dict(block_size=p.block, gates="store" if p.store else "recompute", unroll=p.unroll, recurrence=p.recurrence)


def _label(p: plan.Plan) -> str:
    kernel = "" if p.recurrence == "scan" else f" {p.recurrence}"  # "native": the compiled kernel
    return f"C={p.block} {'store' if p.store else 'recompute'} u={p.unroll}{kernel}"


def bench(cell: str, shape, rounds: int, budget: float, budget_fraction: float) -> dict:
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    t0 = time.perf_counter()
    tuned = bj.tune(params, spec, xs, targets, time_budget=budget, progress=False)
    tune_s = time.perf_counter() - t0
    rules = plan.resolve(plan.Options(), spec, t, b, jnp.float32, use_cache=False)
    grads = (
        gated.jax_contenders(cell, spec) if cell != "elman" else bptt_speed.jax_contenders(spec)
    )  # the jax.grad ones
    grads = {k: v for k, v in grads.items() if k.startswith("grad(")}
    contenders = dict(grads)  # first: the memory budget is a share of theirs
    contenders[RULES] = lambda p, x, d: bj.bptt(p, spec, x, d, **_explicit(rules))
    if tuned != rules:  # the same plan is the same program: timed once, reported for both
        contenders[TUNED] = lambda p, x, d: bj.bptt(p, spec, x, d, **_explicit(tuned))
    contenders[BUDGETED] = None  # filled in once the jax.grad contenders' temp memory is known
    contenders[BUDGET_TUNED] = None  # then tune under that budget, and the plan it records
    runners, info, ref = {}, {}, None
    limit, fits, budget_plan, budget_tune_s = None, True, None, None
    for name, fn in contenders.items():
        if name == BUDGET_TUNED:
            if not fits:
                continue
            t0 = time.perf_counter()
            budget_plan = bj.tune(params, spec, xs, targets, max_memory=limit, time_budget=budget, progress=False)
            budget_tune_s = time.perf_counter() - t0
            gradient._within_budget.cache_clear()  # the untuned choice was memoised: read the entry now
            fn = lambda p, x, d, limit=limit: bj.bptt(p, spec, x, d, max_memory=limit)  # noqa: E731
        if name == BUDGETED:
            limit = int(budget_fraction * min(info[k]["temp"] for k in grads))
            try:
                bj.bptt(params, spec, xs, targets, max_memory=limit)
            except ValueError:  # no plan fits: reported as such
                fits = False
                continue
            fn = lambda p, x, d, limit=limit: bj.bptt(p, spec, x, d, max_memory=limit)  # noqa: E731
        compiled, _, temp, _ = bptt_speed.compile_jax(fn, params, xs, targets)
        value, g = compiled(params, xs, targets)[:2]
        if name.startswith("grad(") and ref is None:
            ref = (value, g)
        info[name] = {"temp": temp, "out": (value, g)}
        runners[name] = lambda c=compiled: bptt_speed._block(c(params, xs, targets))
    for name in info:
        info[name]["err"] = bptt_speed.max_rel_err(info[name].pop("out"), ref)
    med = bptt_speed.round_robin(runners, rounds)
    if TUNED not in med:
        med[TUNED], info[TUNED] = med[RULES], info[RULES]
    best_grad = min((k for k in grads), key=lambda k: med[k])
    return {
        "med": med,
        "info": info,
        "best_grad": best_grad,
        "rules": rules,
        "tuned": tuned,
        "tune_s": tune_s,
        "limit": limit,
        "fits": fits,
        "budget_plan": budget_plan,
        "budget_tune_s": budget_tune_s,
    }


LAYER_SHAPES = ((128, 32, 64, 256), (128, 32, 256, 256))  # (T, B, N, N1): nnx_speed.py's two layers
QUICK_LAYER_SHAPES = ((8, 4, 5, 6),)


def bench_layer(cell: str, shape, rounds: int, budget: float) -> dict:
    """One layer's forward + backward (``rnn_states``, what the NNX / Equinox layers run): the plan the
    rules choose, the plan ``tune_states`` recorded, and ``grad="autodiff"`` (jax.grad of the same
    scans), round-robin; gradients checked against autodiff's."""
    t, b, n, n1 = shape
    spec = bj.RNNSpec(n, (n1,), 1, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    ct = jax.random.normal(jax.random.key(2), (t, b, n1), jnp.float32)
    t0 = time.perf_counter()
    tuned = bj.tune_states(params, spec, xs, time_budget=budget, progress=False)
    tune_s = time.perf_counter() - t0
    rules = _states_rules(params, spec, xs)

    def fwd_bwd(**kw):
        def f(p, x):
            _, pull = jax.vjp(lambda p, x: vjp.rnn_states(p, spec, x, **kw), p, x)
            return pull(ct)

        return f

    contenders = {"autodiff": fwd_bwd(grad="autodiff"), RULES: fwd_bwd(**_explicit_states(rules))}
    if tuned != rules:
        contenders[TUNED] = fwd_bwd(**_explicit_states(tuned))
    runners, info = {}, {}
    for name, fn in contenders.items():
        compiled, _, temp, _ = bptt_speed.compile_jax(fn, params, xs)
        info[name] = {"temp": temp, "out": compiled(params, xs)}
        runners[name] = lambda c=compiled: bptt_speed._block(c(params, xs))
    want = info["autodiff"]["out"]
    for name in info:
        info[name]["err"] = bptt_speed.max_rel_err(info[name]["out"], want)
    med = bptt_speed.round_robin(runners, rounds)
    if TUNED not in med:
        med[TUNED], info[TUNED] = med[RULES], info[RULES]
    return {"med": med, "info": info, "rules": rules, "tuned": tuned, "tune_s": tune_s}


def _states_rules(params, spec, xs) -> plan.Plan:
    """The plan ``rnn_states`` runs without a tuned entry (its rules), as a ``plan.Plan``."""
    asked, x, h0, lengths, _ = vjp.prepare(params, spec, xs, None, None, "bptt", None, "auto", "auto", None, None)
    unroll, rec, (gates, block, _) = vjp._plan(params, spec, asked, x, h0, lengths, None, use_cache=False)
    width = max(plan.block_width(spec), spec.hidden_sizes[-1])
    t, b = x.shape[:2]
    store = plan.resolve_gates(gates, spec, t, b, None, x.dtype)
    c = vjp._block(spec, (gates, block, None), t, b, width, rec)
    return plan.Plan(block=c, store=store, segment=None, unroll=unroll, recurrence=rec, with_dxs=True)


def _explicit_states(p: plan.Plan) -> dict:
    return dict(block_size=p.block, gates="store" if p.store else "recompute", unroll=p.unroll, recurrence=p.recurrence)


def main_layers(args, argv) -> str:
    """``--layers``: the NNX / Equinox layers' plans before and after ``tune_states``."""
    rounds = args.rounds or (2 if args.quick else 9)
    cells = args.cell or ["elman", "gru", "lstm"]
    lines = gate_blocks.header("A layer's explicit BPTT before and after tuning", "tune_speed.py", argv, rounds) + [
        f"One layer's forward + backward through `rnn_states` (what the NNX and Equinox layers run), float32; "
        f"`tune_states`' budget {args.budget:.0f} s per shape. Speed-up: `grad=\"autodiff\"`'s time (jax.grad of "
        "the same scans) over the plan's (higher is better).",
        "",
        "| cell | (T, B, N, N1) | rules' plan | tuned plan | tune s | rules over autodiff | tuned over autodiff "
        "| tuned over rules | temp: rules / tuned / autodiff | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for shape in QUICK_LAYER_SHAPES if args.quick else LAYER_SHAPES:
            r = bench_layer(cell, shape, rounds, args.budget)
            med, info = r["med"], r["info"]
            mib = lambda k, info=info: info[k]["temp"] / 2**20  # noqa: E731
            lines.append(
                f"| {cell} | {shape} | {_label(r['rules'])} | "
                f"{'the same' if r['tuned'] == r['rules'] else _label(r['tuned'])} | {r['tune_s']:.0f} | "
                f"{med['autodiff'] / med[RULES]:.2f}x | {med['autodiff'] / med[TUNED]:.2f}x | "
                f"{med[RULES] / med[TUNED]:.2f}x | {mib(RULES):.1f} / {mib(TUNED):.1f} / {mib('autodiff'):.1f} MiB | "
                f"{max(v['err'] for v in info.values()):.1e} |"
            )
            print(lines[-1], flush=True)
    return bptt_speed._report(lines, args.out)


def grads_of(med: dict) -> list[str]:
    """The jax.grad contenders among the timed ones."""
    return [k for k in med if k.startswith("grad(")]


def _beats(med: dict, name: str) -> str:
    """Whether ``name`` ran faster than every jax.grad contender ("yes" / "no")."""
    return "yes" if all(med[name] < med[k] for k in grads_of(med)) else "no"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9, quick 2)")
    ap.add_argument("--budget", type=float, default=60.0, help="tune's time budget per shape, seconds")
    ap.add_argument("--cell", action="append", choices=("elman", "gru", "lstm"), help="default: all three")
    ap.add_argument(
        "--memory-fraction",
        type=float,
        default=0.4,
        help="max_memory for the budgeted contender, a share of the smallest jax.grad contender's temp (0.4)",
    )
    ap.add_argument(
        "--layers", action="store_true", help="the NNX / Equinox layers' plans (rnn_states, tune_states) instead"
    )
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 9)
    cells = args.cell or ["elman", "gru", "lstm"]
    saved = os.environ.get("BPTT_JAX_CACHE_DIR")
    lines = gate_blocks.header("The explicit BPTT before and after tuning", "tune_speed.py", argv, rounds) + [
        f"tune's budget {args.budget:.0f} s per shape. Speed-up: the best `jax.grad` contender's time over the "
        "plan's (higher is better).",
        "",
        "| cell | (T, B, N, N1, M) | rules' plan | tuned plan | tune s | rules over best grad | tuned over best grad "
        "| tuned over rules | best grad contender | temp: rules / tuned / best grad | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bptt-jax-tune-bench-") as cache:
        os.environ["BPTT_JAX_CACHE_DIR"] = cache
        try:
            if args.layers:
                return main_layers(args, argv)
            geo: dict[str, list[tuple[float, float]]] = {}
            budget_rows: list[str] = []
            for cell in cells:
                shapes = (
                    bptt_speed.QUICK_SHAPES
                    if args.quick
                    else (bptt_speed.SHAPES if cell == "elman" else bptt_speed.GATED_SHAPES)
                )
                for shape in shapes:
                    r = bench(cell, shape, rounds, args.budget, args.memory_fraction)
                    med, info, g = r["med"], r["info"], r["best_grad"]
                    su_rules, su_tuned = med[g] / med[RULES], med[g] / med[TUNED]
                    geo.setdefault(cell, []).append((su_rules, su_tuned))
                    mib = lambda k, info=info: info[k]["temp"] / 2**20  # noqa: E731
                    err = max(v["err"] for v in info.values())
                    lines.append(
                        f"| {cell} | {shape} | {_label(r['rules'])} | "
                        f"{'the same' if r['tuned'] == r['rules'] else _label(r['tuned'])} | {r['tune_s']:.0f} | "
                        f"{su_rules:.2f}x | {su_tuned:.2f}x | {med[RULES] / med[TUNED]:.2f}x | "
                        f"{g} | {mib(RULES):.1f} / {mib(TUNED):.1f} / {mib(g):.1f} MiB | {err:.1e} |"
                    )
                    print(lines[-1], flush=True)
                    lim = f"{r['limit'] / 2**20:.1f} MiB"
                    if r["fits"]:
                        budget_rows.append(
                            f"| {cell} | {shape} | {lim} | {mib(BUDGETED):.1f} MiB | {med[g] / med[BUDGETED]:.2f}x | "
                            f"{med[RULES] / med[BUDGETED]:.2f}x | {_label(r['budget_plan'])} | "
                            f"{r['budget_tune_s']:.0f} | {mib(BUDGET_TUNED):.1f} MiB | "
                            f"{med[g] / med[BUDGET_TUNED]:.2f}x | {_beats(med, BUDGET_TUNED)} |"
                        )
                    else:
                        budget_rows.append(f"| {cell} | {shape} | {lim} | no plan fits | - | - | - | - | - | - | - |")
            lines += [
                "",
                f"Under `max_memory` = {args.memory_fraction} x the smallest `jax.grad` contender's temp memory:",
                "",
                "The budgeted call untuned (the plan ``budget.choose`` picks: the first candidate that fits), then "
                "after ``tune(..., max_memory=...)`` under the same budget (the fastest candidate that fits, "
                "measured here).",
                "",
                "| cell | (T, B, N, N1, M) | max_memory | untuned: its plan's temp | over best grad | over the "
                "rules' plan | tuned under the budget: plan | tune s | temp | over best grad | faster than every "
                "jax.grad contender |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
                *budget_rows,
            ]
            lines += ["", "| cell | geometric mean: rules over best grad | tuned over best grad |", "|---|---|---|"]
            for cell, rows in geo.items():
                gm = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))  # noqa: E731
                lines.append(f"| {cell} | {gm([a for a, _ in rows]):.2f}x | {gm([b for _, b in rows]):.2f}x |")
        finally:
            if saved is None:
                os.environ.pop("BPTT_JAX_CACHE_DIR", None)
            else:
                os.environ["BPTT_JAX_CACHE_DIR"] = saved
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
