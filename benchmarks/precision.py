"""Mixed precision: bptt with ``compute_dtype="bfloat16"`` against float32, memory and speed.

    python benchmarks/precision.py [--rounds R] [--quick] [--out FILE] [--cell elman|gru|lstm ...]

For every cell at the gated benchmark shapes (one layer + softmax readout, as ``bptt_speed.py
--cell``), four contenders compiled and timed side by side in one process (round robin, random
order): the default ``bptt`` call in float32 and with ``RNNSpec(compute_dtype="bfloat16")``, and
``jax.grad`` of ``bj.loss`` under each of the two policies. Reported: compiled temp memory (XLA's
``memory_analysis()``), median time, bfloat16 over float32 for both, and each bfloat16 gradient's
largest relative difference from the float32 explicit BPTT's (the policy's rounding, not an error
of the BPTT: ``tests/test_precision.py`` holds that to jax.grad's against float64).

``--torch`` adds PyTorch's ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` + ``nn.Linear`` in float32, eager
(cuDNN on a GPU, oneDNN on the CPU; each library at its own default float32 matmul precision, TF32
on NVIDIA GPUs), and the bfloat16 explicit BPTT's time over it. On a GPU the shapes add
(1000, 64, 128, 256, 128) (issue 35's cuDNN table). The report is written after every shape, so a
run stopped at its time limit keeps what it measured.

Issue 33's target: temp memory of the default call with bfloat16 compute at most 0.6x float32's.
"""

from __future__ import annotations

import dataclasses
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
import gated  # noqa: E402

import bptt_jax as bj  # noqa: E402

QUICK_SHAPES = [(12, 3, 5, 6, 7)]
GPU_EXTRA_SHAPES = [(1000, 64, 128, 256, 128)]  # issue 35: cuDNN's speed at every shape with N1 <= 256
TARGET = 0.6  # issue 33: bfloat16 temp memory at most 0.6x float32's


def bench(cell: str, shape, rounds: int, torch_too: bool = False) -> dict:
    """{contender: (temp bytes, median s, largest rel. difference of its gradients from bptt float32's)};
    with ``torch_too`` also PyTorch's layer in float32 (temp memory not measured: nan)."""
    t, b, n, n1, m = shape
    spec32 = bj.RNNSpec(n, (n1,), m, cell=cell)
    spec16 = dataclasses.replace(spec32, compute_dtype="bfloat16")
    params = bj.init_params(jax.random.key(0), spec32)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    fns = {
        "bptt float32": lambda p, x, d: bj.bptt(p, spec32, x, d)[:2],
        "bptt bfloat16": lambda p, x, d: bj.bptt(p, spec16, x, d)[:2],
        "grad(loss) float32": jax.value_and_grad(lambda p, x, d: bj.loss(p, spec32, x, d)),
        "grad(loss) bfloat16": jax.value_and_grad(lambda p, x, d: bj.loss(p, spec16, x, d)),
    }
    runners, temps, outs = {}, {}, {}
    for name, fn in fns.items():
        compiled, _, temps[name], _ = bptt_speed.compile_jax(fn, params, xs, targets)
        outs[name] = compiled(params, xs, targets)
        runners[name] = lambda c=compiled: bptt_speed._block(c(params, xs, targets))
    ref = outs["bptt float32"]
    diffs = {k: bptt_speed.max_rel_err(outs[k], ref) for k in fns}
    tc = gated.torch_contender(cell, spec32, params, xs, targets, os.cpu_count()) if torch_too else None
    if tc is not None:
        run, grads, _ = tc
        name = f"torch nn.{gated.TORCH_MODULES[cell]} float32"
        temps[name], diffs[name], runners[name] = float("nan"), bptt_speed.max_rel_err(grads(), ref[1]), run
    med = bptt_speed.round_robin(runners, rounds)
    return {k: (temps[k], med[k], diffs[k]) for k in runners}


def main(argv=None) -> str:
    def extra(ap):
        ap.add_argument("--torch", action="store_true", help="add PyTorch's layer in float32 (cuDNN on a GPU)")

    args, rounds = gate_blocks.parse_report_args(__doc__, argv, bptt_speed.CELLS, 11, extra)
    on_gpu = jax.default_backend() == "gpu"
    shapes = QUICK_SHAPES if args.quick else bptt_speed.GATED_SHAPES + (GPU_EXTRA_SHAPES if on_gpu else [])
    lines = gate_blocks.header("Mixed precision: bfloat16 compute against float32", "precision.py", argv, rounds)
    lines += [
        "Per shape: compiled temp memory and median ms of each contender; bf16 / f32: the bfloat16 "
        f"contender's over its float32 twin's (temp: target <= {TARGET}x for bptt; time: below 1 is faster); "
        "diff: largest relative difference of DIV and the gradients from bptt float32's.",
    ]
    summary = []
    for cell in args.cell or bptt_speed.CELLS:
        lines += [
            "",
            f"## {cell.upper()}",
            "",
            "| T, B, N, N1, M | contender | temp | ms | temp bf16 / f32 | time bf16 / f32 | diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for shape in shapes:
            try:
                rows = bench(cell, shape, rounds, args.torch)
            except Exception as e:  # report it and go on: one run should show every failure
                lines.append(f"| {shape} | FAILED: {type(e).__name__}: {' '.join(str(e).split())[:300]} | | | | | |")
                print(lines[-1], file=sys.stderr, flush=True)
                continue
            for name, (temp, sec, diff) in rows.items():
                twin = rows[name.replace("bfloat16", "float32")]
                ratios = f"{temp / twin[0]:.2f} | {sec / twin[1]:.2f}" if "bfloat16" in name else " | "
                temp_txt = "n/a" if temp != temp else bptt_speed.fmt_bytes(temp)
                lines.append(f"| {shape} | {name} | {temp_txt} | {1e3 * sec:.2f} | {ratios} | {diff:.1e} |")
            (t16, s16, _), (t32, s32, _) = rows["bptt bfloat16"], rows["bptt float32"]
            torch_s = [v[1] for k, v in rows.items() if k.startswith("torch")]
            vs_torch = " | ".join(f"{torch_s[0] / s:.2f}" for s in (s32, s16)) if torch_s else "n/a | n/a"
            summary.append(f"| {cell} | {shape} | {t16 / t32:.2f} | {s16 / s32:.2f} | {vs_torch} |")
            if args.out:  # what is measured so far survives a run stopped at its time limit
                Path(args.out).write_text("\n".join(lines + _summary(summary)) + "\n", encoding="utf-8")
    return bptt_speed._report(lines + _summary(summary), args.out)


def _summary(rows) -> list[str]:
    return [
        "",
        "## Summary: bptt bfloat16 over bptt float32, and PyTorch's time over each bptt's (speed-up)",
        "",
        "| cell | T, B, N, N1, M | temp bf16 / f32 | time bf16 / f32 | torch / bptt f32 | torch / bptt bf16 |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


if __name__ == "__main__":
    main()
