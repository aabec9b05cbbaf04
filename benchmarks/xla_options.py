"""XLA:CPU's own compiler options for the explicit BPTT's program, measured side by side.

    python benchmarks/xla_options.py [--quick] [--rounds R] [--out FILE] [--cell elman|gru|lstm ...]

For each cell at the gated benchmark shapes (one layer + softmax readout, float32, the rules' plan:
the plan cache is off), the default ``bptt`` call is compiled once per option set below, each
through ``jax.jit(...).lower(...).compile(compiler_options=...)`` (per computation: no global
``XLA_FLAGS``, no ``jax.config`` change), its loss and gradients checked against the default
options' (relative 1e-5: an option may reorder float32 sums, never change the math beyond rounding),
and all of them timed in one process, round robin in a fresh random order each round. Reported:
each option set's median time over the default options' (below 1: faster). An option XLA rejects on
this machine is reported as such. ``xla_cpu_enable_fast_math`` is left out on purpose: it trades
the functions' accuracy for speed, which an exact gradient does not take. Also left out: oneDNN's
experimental fusions (``xla_cpu_experimental_onednn_fusion_type`` = dot,eltwise with
``xla_cpu_use_onednn``): on the 2-core AMD EPYC (AVX2) the GRU's (100, 32, 64, 128, 64) program
failed to compile ("partition compile failed") and the process died of an illegal instruction,
which no ``try`` here can catch.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import gate_blocks  # noqa: E402

import bptt_jax as bj  # noqa: E402

DOT_ELT = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"
OPTIONS: dict[str, dict] = {
    "default": {},
    "no XNNPACK (Eigen matmuls)": {"xla_cpu_use_xnnpack": False},
    "oneDNN": {"xla_cpu_use_onednn": True},
    "YNN fusions dot,eltwise": {"xla_cpu_experimental_ynn_fusion_type": DOT_ELT},
    "XNN fusions dot,eltwise": {"xla_cpu_experimental_xnn_fusion_type": DOT_ELT},
    "XNN graph fusion greedy": {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "opt preset FAST_RUNTIME": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"},
    "scheduler concurrency-optimized": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"},
    "vector width 512": {"xla_cpu_prefer_vector_width": 512},
    "single-threaded Eigen": {"xla_cpu_multi_thread_eigen": False},
    "no fusion emitters": {"xla_cpu_use_fusion_emitters": False},
}
QUICK_SHAPES = [(12, 3, 5, 6, 7)]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def bench(cell: str, shape, rounds: int, names: list[str]) -> dict:
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    args = (params, xs, targets)

    def f(p, xs, d):
        div, grads, _ = bj.bptt(p, spec, xs, d, recurrence="scan")
        return div, grads

    lowered = jax.jit(f).lower(*args)
    runners, errors, rejected = {}, {}, {}
    ref = None
    for name in names:
        try:
            compiled = lowered.compile(compiler_options=OPTIONS[name]) if OPTIONS[name] else lowered.compile()
        except Exception as e:  # an option this jaxlib or CPU does not take
            rejected[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        out = compiled(*args)
        leaves = jax.tree_util.tree_leaves(out)
        if ref is None:
            ref = leaves
        errors[name] = max(_rel(a, r) for a, r in zip(leaves, ref))
        if errors[name] > 1e-5:
            raise AssertionError(f"{cell} {shape} {name}: gradients differ from the default's by {errors[name]:.1e}")
        runners[name] = (lambda c: lambda: bptt_speed._block(c(*args)))(compiled)
    med = bptt_speed.round_robin(runners, rounds)
    return {"shape": shape, "med": med, "errors": errors, "rejected": rejected}


@contextlib.contextmanager
def rules_only():
    """The plan cache off while the programs are traced (the rules' plans, never a tuned one), and
    the environment as it was afterwards (the test suite runs ``main`` in its own process)."""
    old = os.environ.get("BPTT_JAX_PLAN_CACHE")
    os.environ["BPTT_JAX_PLAN_CACHE"] = "off"
    try:
        yield
    finally:
        if old is None:
            del os.environ["BPTT_JAX_PLAN_CACHE"]
        else:
            os.environ["BPTT_JAX_PLAN_CACHE"] = old


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out")
    ap.add_argument("--cell", action="append", choices=["elman", "gru", "lstm"])
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES
    rounds = 2 if args.quick else args.rounds
    # --quick (the test suite's smoke run) keeps to options that only re-route or reschedule: an
    # experimental one that crashes the compiler on some CPU must not take the suite down with it.
    names = ["default", "no XNNPACK (Eigen matmuls)", "single-threaded Eigen"] if args.quick else list(OPTIONS)
    lines = gate_blocks.header("XLA:CPU compiler options for the explicit BPTT", "xla_options.py", argv, rounds)
    lines += [
        "Each option set's median time of the default `bptt` call over the default options' (below 1:"
        " faster); gradients checked equal to the default options' to 1e-5 relative first.",
        "",
    ]
    for cell in args.cell or ["elman", "gru", "lstm"]:
        with rules_only():
            rows = [bench(cell, s, rounds, names) for s in shapes]
        head = "| option set | " + " | ".join(f"({', '.join(map(str, r['shape']))})" for r in rows) + " | geomean |"
        lines += [f"## {cell.upper()}", "", head, "|---" * (len(rows) + 2) + "|"]
        for name in names:
            cells_, ratios = [], []
            for r in rows:
                if name in r["rejected"]:
                    cells_.append("rejected")
                    continue
                ratio = r["med"][name] / r["med"]["default"]
                ratios.append(ratio)
                cells_.append(f"{ratio:.2f}")
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
            lines.append(f"| {name} | " + " | ".join(cells_) + f" | {geo:.2f} |")
        default_ms = ", ".join(f"{r['med']['default'] * 1e3:.2f}" for r in rows)
        lines += ["", f"The default options' medians (ms): {default_ms}."]
        for r in rows:
            for name, why in r["rejected"].items():
                lines.append(f"- {r['shape']}: {name} rejected ({why})")
        lines.append("")
        print(f"{cell} done", file=sys.stderr)
        if args.out:  # what is measured so far, in case a later option takes the process down
            Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return bptt_speed._report(lines, args.out)  # printed, and written to --out


if __name__ == "__main__":
    main()
