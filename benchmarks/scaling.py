"""How the explicit BPTT's time and memory grow with T, with and without a memory budget.

    python benchmarks/scaling.py [--quick] [--cell elman|gru|lstm ...] [--lengths 100,1000,...]
                                 [--max-memory 256MiB] [--out FILE] [--plot FILE.png]
                                 [--batches 1,4,16,64,256] [--widths 32,64,128,256,512] [--sweep-t T] [--no-lengths]
                                 [--bidirectional] [--segments] [--nested] [--compile-only]

For each cell (one unidirectional layer, B 16, N 64, N1 128, M 64, float32, softmax + cross-entropy)
and each T (10^2 ... 10^6 by default), side by side in one process: the default ``bptt`` call (the
rules' plan), the same call under ``max_memory`` (``--max-memory``, 256 MiB by default), and
``jax.grad`` through a plain ``lax.scan`` of the same loss (benchmarks/gated.py's, or the Elman
cell's ``bptt_speed.naive_loss``). Every contender is compiled first and its temp memory read from
XLA's memory analysis; it runs only when that and the inputs fit in ``--ram-share`` of this
machine's memory (the rows say "does not fit" otherwise, with the temp memory it would need). Times
are medians of a few calls after a warm-up (one call at T >= 10^5, and no warm-up at 10^6); gradients are checked against
the budgeted call's. The report gives seconds per call, microseconds per step and temp memory; with
``--plot`` a log-log figure of both against T. ``--batches`` and ``--widths`` add the same
contenders at one T (``--sweep-t``) against B and against N1 (``--no-lengths``: those alone).
``--bidirectional`` makes the layer bidirectional (its ``jax.grad`` contender: ``jax.grad`` of
``bj.loss``); ``--segments`` adds ``bptt`` with checkpoint segments of about sqrt(T) steps,
``--nested`` the two nested levels that ``max_memory`` tries (about T^(2/3), T^(1/3));
``--compile-only`` reports the compiled temp memory and runs nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
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
from bptt_jax.core import budget  # noqa: E402

B, N, N1, M = 16, 64, 128, 64
LENGTHS = (100, 1000, 10_000, 100_000, 1_000_000)
QUICK = dict(B=2, N=3, N1=4, M=3, lengths=(20, 200))


def _ram() -> int:
    """This machine's physical memory in bytes (Linux; 8 GiB where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def segment_steps(t_len: int) -> int:
    """k for the ``--segments`` contender: the divisor of T nearest sqrt(T)."""
    return min((d for d in range(1, t_len + 1) if t_len % d == 0), key=lambda d: abs(d - math.isqrt(t_len)))


def nested_steps(t_len: int) -> tuple[int, int]:
    """(k1, k2) for the ``--nested`` contender: the two levels ``max_memory`` tries (budget.candidates)."""
    k1 = budget._near_divisor(t_len, round(t_len ** (2 / 3)))
    return k1, budget._near_divisor(k1, math.isqrt(k1))


def contenders(cell: str, spec, limit: int, t_len: int, segments: bool, nested: bool = False) -> dict:
    if spec.bidirectional:  # jax.grad of the library's own forward loss (two plain lax.scans)
        grad, grad_name = (lambda p, x, d: bj.loss(p, spec, x, d)), "jax.grad (bj.loss)"
    else:
        grad = gated.plain_loss(cell) if cell != "elman" else bptt_speed.naive_loss
        grad_name = "jax.grad (plain scan)"
    out = {
        "bptt (default)": lambda p, x, d: bj.bptt(p, spec, x, d)[:2],
        f"bptt max_memory={budget.format_bytes(limit)}": lambda p, x, d: bj.bptt(p, spec, x, d, max_memory=limit)[:2],
    }
    if segments:
        k = segment_steps(t_len)
        out[f"bptt checkpoint_every={k}"] = lambda p, x, d: bj.bptt(p, spec, x, d, checkpoint_every=k)[:2]
    if nested:
        levels = nested_steps(t_len)
        out[f"bptt checkpoint_every={levels}"] = lambda p, x, d: bj.bptt(p, spec, x, d, checkpoint_every=levels)[:2]
    out[grad_name] = jax.value_and_grad(grad)
    return out


def measure(
    cell: str,
    t_len: int,
    sizes: dict,
    limit: int,
    ram_share: float,
    bidirectional=False,
    segments=False,
    nested=False,
    compile_only=False,
) -> list[dict]:
    b, n, n1, m = sizes["B"], sizes["N"], sizes["N1"], sizes["M"]
    spec = bj.RNNSpec(n, (n1,), m, cell=cell, bidirectional=bidirectional)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t_len, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t_len, b), 0, m)
    args_bytes = xs.nbytes + targets.nbytes
    rows, ref = [], None
    for name, fn in contenders(cell, spec, limit, t_len, segments, nested).items():
        row = {"cell": cell, "T": t_len, "contender": name}
        try:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(params, xs, targets).compile()
            row["compile_s"] = time.perf_counter() - t0
        except ValueError as e:  # a budget no plan fits
            row["note"] = str(e).split(":")[1].strip()
            rows.append(row)
            continue
        row["temp"] = budget.temp_bytes(compiled)
        if row["temp"] + 2 * args_bytes > ram_share * _ram():
            row["note"] = "does not fit this machine's memory"
            rows.append(row)
            continue
        if compile_only:
            row["note"] = "compiled only"
            rows.append(row)
            continue
        calls = 1 if t_len >= 100_000 else 3
        if t_len < 1_000_000:  # at 10^6 steps a call takes minutes and was compiled above: no warm-up
            jax.block_until_ready(compiled(params, xs, targets))
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            out = compiled(params, xs, targets)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
        row["seconds"] = statistics.median(times)
        if name.startswith("bptt max_memory"):
            ref = out
        row["out"] = out
        rows.append(row)
    for row in rows:
        out = row.pop("out", None)
        if out is not None and ref is not None:
            row["err"] = bptt_speed.max_rel_err(out, ref)
    del xs, targets
    return rows


def sweep(cells: list[str], key: str, values: str, sizes: dict, t_len: int, limit: int, ram_share: float) -> list[str]:
    """The same contenders at one T against B or N1 (``key``), the other sizes as the T sweep's."""
    lines = [
        "",
        f"### Against {key} (T = {t_len}, the other sizes as above)",
        "",
        f"| cell | {key} | contender | s per gradient | us per step | temp memory | temp per {key} | max rel err vs budgeted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for v in (int(x) for x in values.split(",")):
            for r in measure(cell, t_len, {**sizes, key: v}, limit, ram_share):
                temp = budget.format_bytes(r["temp"]) if "temp" in r else "-"
                per = budget.format_bytes(r["temp"] / v) if "temp" in r else "-"
                if "seconds" in r:
                    timing = f"{r['seconds']:.4g} | {1e6 * r['seconds'] / t_len:.2f}"
                else:
                    timing = f"{r.get('note', '-')} | -"
                err = f"{r['err']:.1e}" if "err" in r else "-"
                lines.append(f"| {cell} | {v} | {r['contender']} | {timing} | {temp} | {per} | {err} |")
                print(lines[-1], flush=True)
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({r["cell"] for r in rows})
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 6.5), squeeze=False)
    for j, cell in enumerate(cells):
        for name in dict.fromkeys(r["contender"] for r in rows if r["cell"] == cell):
            pts = [r for r in rows if r["cell"] == cell and r["contender"] == name]
            timed = [(r["T"], r["seconds"]) for r in pts if "seconds" in r]
            mem = [(r["T"], r["temp"]) for r in pts if "temp" in r]
            if timed:
                axes[0][j].loglog(*zip(*timed), marker="o", label=name)
            if mem:
                axes[1][j].loglog(*zip(*mem), marker="o", label=name)
        axes[0][j].set_title(f"{cell}: seconds per gradient")
        axes[1][j].set_title(f"{cell}: compiled temp memory (bytes)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("T")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--cell", action="append", choices=("elman", "gru", "lstm"), help="default: all three")
    ap.add_argument("--lengths", help="comma-separated T values (default 100,1000,...,1000000)")
    ap.add_argument("--max-memory", default="256MiB", help="the budgeted contender's max_memory (256MiB)")
    ap.add_argument("--ram-share", type=float, default=0.6, help="run a contender only within this share of RAM")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--plot", help="write the log-log figure here (.png)")
    ap.add_argument("--batches", help="also sweep B (comma-separated) at T = --sweep-t, the other sizes fixed")
    ap.add_argument("--widths", help="also sweep N1 (comma-separated) at T = --sweep-t, the other sizes fixed")
    ap.add_argument("--sweep-t", type=int, default=1000, help="T of the B and N1 sweeps (1000)")
    ap.add_argument("--no-lengths", action="store_true", help="only the B / N1 sweeps, not the T sweep")
    ap.add_argument("--bidirectional", action="store_true", help="one bidirectional layer (the T sweep)")
    ap.add_argument(
        "--segments", action="store_true", help="also bptt with checkpoint_every = the divisor nearest sqrt(T)"
    )
    ap.add_argument("--nested", action="store_true", help="also bptt with the two nested levels max_memory tries")
    ap.add_argument("--compile-only", action="store_true", help="compile and report temp memory, run nothing")
    args = ap.parse_args(argv)
    sizes = dict(QUICK) if args.quick else dict(B=B, N=N, N1=N1, M=M, lengths=LENGTHS)
    lengths = tuple(int(float(v)) for v in args.lengths.split(",")) if args.lengths else sizes["lengths"]
    limit = budget.parse_memory(args.max_memory if not args.quick else "64KiB")
    lines = gate_blocks.header("How time and memory grow with T", "scaling.py", argv, 3, " (1 call at T >= 1e5)")
    lines += [
        f"One {'bidirectional' if args.bidirectional else 'unidirectional'} layer, B {sizes['B']}, N {sizes['N']}, N1 {sizes['N1']}, M {sizes['M']}, float32; this "
        f"machine's memory {_ram() / 2**30:.1f} GiB (a contender runs when its temp memory and twice the inputs fit "
        f"in {args.ram_share:.0%} of it).",
        "",
        "| cell | T | contender | s per gradient | us per step | temp memory | compile s | max rel err vs budgeted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows: list[dict] = []
    for cell in args.cell or ["elman", "gru", "lstm"]:
        for t_len in () if args.no_lengths else lengths:
            for r in measure(
                cell,
                t_len,
                sizes,
                limit,
                args.ram_share,
                args.bidirectional,
                args.segments,
                args.nested,
                args.compile_only,
            ):
                rows.append(r)
                temp = budget.format_bytes(r["temp"]) if "temp" in r else "-"
                if "seconds" in r:
                    timing = f"{r['seconds']:.4g} | {1e6 * r['seconds'] / t_len:.2f}"
                else:
                    timing = f"{r.get('note', '-')} | -"
                err = f"{r['err']:.1e}" if "err" in r else "-"
                compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
                lines.append(f"| {cell} | {t_len:.0e} | {r['contender']} | {timing} | {temp} | {compile_s} | {err} |")
                print(lines[-1], flush=True)
    for key, values in (("B", args.batches), ("N1", args.widths)):
        if values:
            lines += sweep(
                args.cell or ["elman", "gru", "lstm"], key, values, sizes, args.sweep_t, limit, args.ram_share
            )
    if args.plot:
        plot(rows, args.plot)
        lines += ["", f"Figure: {args.plot}"]
    per_step = {}
    for r in rows:
        if "seconds" in r and r["contender"].startswith("bptt max_memory"):
            per_step.setdefault(r["cell"], []).append((r["T"], r["seconds"] / r["T"]))
    if per_step:
        lines += ["", "Budgeted time per step, largest T over T = 10^4 (or the nearest measured): "]
        for cell, pts in per_step.items():
            base = min(pts, key=lambda p: abs(math.log10(p[0]) - 4))
            lines.append(f"- {cell}: {pts[-1][1] / base[1]:.2f}x (T = {pts[-1][0]:.0e} over T = {base[0]:.0e})")
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
