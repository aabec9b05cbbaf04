"""Which plan the compiled kernel should run by default: its block size and gates, measured.

    python benchmarks/native_blocks.py [--quick] [--rounds R] [--cell gru|lstm|elman ...] [--out FILE]

For each cell and benchmark shape (``bptt_speed.GATED_SHAPES``, one layer + softmax readout,
float32), side by side in one process, round-robin, medians: the scans' rules plan (recurrence="scan":
the default before the kernel became the gated cells' rule), the same blocks and gates with
``recurrence="native"``, the kernel with the whole sequence as one block (gates stored for a gated
cell: the rules' plan since ``plan.NATIVE_WHOLE_ELEMENTS``), with an intermediate block
(about ``--mid-elements`` elements of [C, B, G N1] per block, C a divisor of T), with the scans' blocks and the gates
recomputed, the rules' own plan where it is none of these (the Elman cell's blocks raised to the
rows its kernel's sums need, ``plan.elman_kernel_block``), and the fastest ``jax.grad`` contender of ``gated.py`` (``bptt_speed.py`` for the Elman
cell). Reported: each plan's time over the scans' rules plan (speed-up, higher is better) and its
compiled temp memory. Gradients are checked against the first ``jax.grad`` contender first (1e-4).
"""

from __future__ import annotations

import argparse
import math
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
from bptt_jax.core import budget, cells, plan  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]
SCANS = "scans, rules"


def _plans(cell: str, spec, t: int, b: int, mid_elements: int) -> dict:
    rules = plan.resolve(plan.Options(recurrence="scan"), spec, t, b, jnp.float32, use_cache=False)
    gated_cell = cells.get(cell).CACHE > 0
    width = plan.block_width(spec)
    mid = budget._near_divisor(t, min(t, max(rules.block, mid_elements // (b * width))))  # no padding steps
    stored = "store" if gated_cell else "auto"
    out = {
        SCANS: dict(block_size=rules.block, gates="store" if rules.store else "recompute", recurrence="scan"),
        "native, scan blocks": dict(
            block_size=rules.block, gates="store" if rules.store else "recompute", recurrence="native"
        ),
        f"native, C={t}": dict(block_size=t, gates=stored, recurrence="native"),
        f"native, C={mid}": dict(block_size=mid, gates=stored, recurrence="native"),
    }
    auto = plan.resolve(plan.Options(), spec, t, b, jnp.float32, use_cache=False)  # the rules' own plan
    if auto.recurrence == "native":  # named where it is none of the plans above (the Elman cell's raised blocks)
        out[f"native, rules (C={auto.block})"] = dict(
            block_size=auto.block, gates="store" if auto.store else "recompute", recurrence="native"
        )
    if gated_cell:
        out["native, scan blocks, recompute"] = dict(block_size=rules.block, gates="recompute", recurrence="native")
    return {k: v for i, (k, v) in enumerate(out.items()) if v not in list(out.values())[:i]}


def bench(cell: str, shape, rounds: int, mid_elements: int) -> dict:
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m, cell=cell)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    grads = gated.jax_contenders(cell, spec) if cell != "elman" else bptt_speed.jax_contenders(spec)
    contenders = {k: v for k, v in grads.items() if k.startswith("grad(")}
    plans = _plans(cell, spec, t, b, mid_elements)
    for name, kw in plans.items():
        contenders[name] = lambda p, x, d, kw=kw: bj.bptt(p, spec, x, d, **kw)
    runners, info, ref = {}, {}, None
    for name, fn in contenders.items():
        compiled, _, temp, _ = bptt_speed.compile_jax(fn, params, xs, targets)
        out = compiled(params, xs, targets)[:2]
        ref = out if ref is None else ref
        info[name] = {"temp": temp, "err": bptt_speed.max_rel_err(out, ref)}
        if info[name]["err"] > 1e-4:
            raise AssertionError(f"{cell} {shape} {name}: gradients {info[name]['err']:.1e} from jax.grad's")
        runners[name] = lambda c=compiled: bptt_speed._block(c(params, xs, targets))
    med = bptt_speed.round_robin(runners, rounds)
    best_grad = min((k for k in contenders if k.startswith("grad(")), key=lambda k: med[k])
    return {"med": med, "info": info, "plans": list(plans), "best_grad": best_grad}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one tiny shape (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9, quick 2)")
    ap.add_argument("--cell", action="append", choices=("elman", "gru", "lstm"), help="default: gru, lstm")
    ap.add_argument("--mid-elements", type=int, default=2**22, help="elements of a block's [C, B, G N1]")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 9)
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES
    lines = gate_blocks.header("The compiled kernel's block size and gates", "native_blocks.py", argv, rounds) + [
        "One layer + softmax readout, float32. Speed-up: the scans' rules plan's time over the plan's "
        "(higher is better); temp: compiled temp memory.",
        "",
    ]
    for cell in args.cell or ["gru", "lstm"]:
        lines += [
            f"## {cell}",
            "",
            "| (T, B, N, N1, M) | plan | ms | speed-up | temp MiB | max rel err |",
            "|---|---|---|---|---|---|",
        ]
        geo: dict[str, list[float]] = {}
        for shape in shapes:
            r = bench(cell, shape, rounds, args.mid_elements)
            base = r["med"][SCANS]
            for name in [*r["plans"], r["best_grad"]]:
                label = name if not name.startswith("native, C=") else name.replace(f"C={shape[0]}", "C=T")
                speed = base / r["med"][name]
                key = label if not label.startswith("native, C=") or label == "native, C=T" else "native, C=mid"
                geo.setdefault(key, []).append(speed)
                lines.append(
                    f"| {shape} | {label} | {1e3 * r['med'][name]:.2f} | {speed:.2f}x | "
                    f"{r['info'][name]['temp'] / 2**20:.1f} | {r['info'][name]['err']:.1e} |"
                )
            print(*lines[-len(r["plans"]) - 1 :], sep="\n", flush=True)
        lines += ["", "| plan | geometric mean speed-up over the scans' rules plan | shapes |", "|---|---|---|"]
        for name, v in geo.items():
            lines.append(f"| {name} | {math.exp(sum(map(math.log, v)) / len(v)):.2f}x | {len(v)} |")
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
