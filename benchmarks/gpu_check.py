"""The GPU check: one prepared run that verifies and times bptt_jax on an NVIDIA GPU.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR [--quick] [--scale S]

Run from the repository root (no install needed: the GPU machine reaches no package registry).
Each part runs in its own process under its own time budget, so a slow or broken part cannot starve
the rest; each writes its log under DIR, and ``DIR/summary.md`` ends with one line per part (exit
status, seconds, budget) and the tables the parts produced. The parts:

  info    device, driver, JAX / CUDA / cuDNN / torch versions (and the TF32 defaults);
  sweep   both recurrences by the kernels and by the scans over B and N1 (where "auto" should pick them);
  probe   the Pallas kernels alone, compiled (not interpreted) at the benchmark shapes: each against
          the scans (full float32 precision) and timed beside them; Triton's warps per program at
          one shape; float64 once, to see whether the kernels could take it;
  tests   the GPU-relevant tests (kernels compiled for the GPU, BPTT = jax.grad in float32 and
          float64, recomputation, the custom VJP, the train step), float32 dots pinned to full
          precision by tests/conftest.py; hypothesis profile "gpu" (5 examples a property test);
  bench   ``benchmarks/bptt_speed.py --kernels --gpu-set``: the five benchmark shapes plus two long
          ones, bptt with the scans and with the kernels, the jax.grad contenders, torch nn.RNN on cuDNN;
  train   ``benchmarks/train_speed.py``: the main job's model, steps per second, bptt / autodiff / torch.
  tests_cells  tests/test_cells.py: GRU and LSTM BPTT = jax.grad (float32, float64), the loop oracle,
          torch cross-checks where torch runs, under the GPU defaults (unroll 8, one block);
  bench_cells  ``bptt_speed.py --cell gru --cell lstm --no-torch-compile``: the gated cells against the
          jax.grad contenders, flax's cells and cuDNN's nn.GRU / nn.LSTM.
  train_gru, train_lstm  ``train_speed.py --cell gru|lstm``: the gated char-LM configs' model, steps per
          second, bptt / autodiff / torch eager (cuDNN).
  precision  ``benchmarks/precision.py --torch``: every cell at the gated shapes plus (1000, 64, 128,
          256, 128), the default bptt in float32 and with bfloat16 compute, jax.grad under both
          policies, PyTorch's layer on cuDNN (issue 33's GPU rows, issue 35's cuDNN table);
  tests_new  the tests of what came after the last GPU run: reduced precision (compute_dtype), the
          planner (budgets, tune, its cache), checkpoint segments (nested, bidirectional);
  tune    ``benchmarks/tune_speed.py --cell lstm``: bptt_jax.tune on the GPU, its plan against the
          rules' and the jax.grad contenders (issue 34's "tuned where it runs");
  adding  ``experiments/adding.py``: IRNN, LSTM (forget bias 0 and 1) and GRU on the adding problem at
          T = 200 and 400, seeds 0-2, all 24 runs at once on the one GPU (each ADDING_RUN_S seconds at
          most, stopping at test MSE < 0.005); tables, plot and every run's folder under DIR/adding.

``--quick`` is the dry run for a CPU (interpret mode, tiny sizes, a few tests): the same code paths,
minutes instead of the GPU's budget. ``--scale`` multiplies every budget.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Seconds per part on the GPU (about 6 minutes together, with process start-ups).
BUDGETS = {
    "info": 20,
    "probe": 50,
    "sweep": 80,
    "tests_kernels": 70,
    "tests": 200,
    "bench": 130,
    "train": 50,
    "tests_cells": 120,
    "bench_cells": 200,
    "train_gru": 45,
    "train_lstm": 45,
    "precision": 240,
    "tests_new": 300,  # run 6 (H200): 150 s ran 38 of its 80 tests
    "tune": 200,  # run 6: 110 s timed 3 of the LSTM's 5 shapes
    "adding": 420,  # ADDING_RUN_S for the runs themselves, the rest for start-up and the tables
}

# The adding study on the GPU: every run at once, each with this wall-clock limit (seconds).
ADDING_RUN_S = 360

GPU_TESTS = ["tests/test_bptt.py", "tests/test_train.py", "tests/test_vjp.py"]
NEW_TESTS = ["tests/test_precision.py", "tests/test_budget.py", "tests/test_tune.py", "tests/test_recompute.py"]


# ----------------------------------------------------------------------------- the parts


def part_info() -> None:
    import jax

    print("python", sys.version.split()[0])
    print("jax", jax.__version__, "backend", jax.default_backend(), "devices", jax.devices())
    d = jax.devices()[0]
    print("device_kind", d.device_kind)
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            print(
                "cuda runtime",
                cuda_versions.cuda_runtime_get_version(),
                "cudnn",
                cuda_versions.cudnn_get_version(),
                "driver",
                cuda_versions.cuda_driver_get_version(),
            )
    except Exception as e:  # the module moved between jax versions
        print("cuda versions unavailable:", type(e).__name__, e)
    print("jax_default_matmul_precision", jax.config.jax_default_matmul_precision)
    try:
        import torch

        print(
            "torch",
            torch.__version__,
            "cuda",
            torch.version.cuda,
            "cudnn",
            torch.backends.cudnn.version(),
            "cuda available",
            torch.cuda.is_available(),
            "cudnn.allow_tf32",
            torch.backends.cudnn.allow_tf32,
            "matmul.allow_tf32",
            torch.backends.cuda.matmul.allow_tf32,
        )
    except Exception as e:
        print("torch unavailable:", type(e).__name__, e)
    try:
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except Exception as e:
        print("nvidia-smi unavailable:", type(e).__name__, e)


def _median_time(fn, *args, rounds=20):
    import statistics

    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_probe(quick: bool) -> None:
    """Each kernel against its scan, in full float32 precision, and timed beside it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bptt_jax.core import forward, kernels
    from bptt_jax.core.cells import elman
    from bptt_jax.core.params import LayerParams

    shapes = [(8, 2, 8), (12, 3, 5)] if quick else [(50, 1, 64), (100, 32, 128), (1000, 16, 128), (1000, 1, 64)]
    warps_shape = (8, 2, 8) if quick else (1000, 16, 128)

    def arrays(t, b, n1, dtype, seed=0):
        rng = np.random.RandomState(seed)
        f = lambda *s: jnp.asarray(rng.randn(*s), dtype)
        lens = rng.randint(0, t + 1, size=b)
        lens[0] = t
        valid = forward.valid_mask(jnp.asarray(lens, jnp.int32), t)
        return f(n1, n1) / np.sqrt(n1), f(t, b, n1), f(b, n1), f(t, b, n1), valid

    def case(t, b, n1, dtype, num_warps=None, time_it=True):
        w11, us, h0, above, valid = arrays(t, b, n1, dtype)
        layer = LayerParams(jnp.eye(n1, dtype=dtype), w11, jnp.zeros(n1, dtype))
        scan_f = jax.jit(lambda u, h: forward.unroll_layer(layer, "tanh", u, h, valid))
        kern_f = jax.jit(lambda u, h: kernels._call_forward(w11, "tanh", u, h, valid, num_warps=num_warps))
        with jax.default_matmul_precision("highest"):
            want = scan_f(us, h0)
            t0 = time.perf_counter()
            got = kern_f(us, h0)
            jax.block_until_ready(got)
            c_fwd = time.perf_counter() - t0
            fwd_err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            scan_r = jax.jit(lambda a: elman.reverse_recurrence(w11, "tanh", want, a, valid, None))
            kern_r = jax.jit(
                lambda a: kernels._call_reverse(w11, "tanh", want, a, valid, jnp.zeros_like(h0), num_warps=num_warps)
            )
            want_r = scan_r(above)
            got_r = kern_r(above)
            rev_err = max(
                float(jnp.max(jnp.abs(g - w)) / max(float(jnp.max(jnp.abs(w))), 1e-30))
                for g, w in zip(jax.tree_util.tree_leaves(got_r), jax.tree_util.tree_leaves(want_r))
            )
        line = f"| {(t, b, n1)} | {jnp.dtype(dtype).name} | {num_warps or 'default'} | {fwd_err:.1e} | {rev_err:.1e} | {c_fwd:.2f}"
        if time_it:
            with jax.default_matmul_precision("highest"):  # jit retraces per precision setting
                ts_hi, tsr_hi = _median_time(scan_f, us, h0), _median_time(scan_r, above)
                tk, tkr = _median_time(kern_f, us, h0), _median_time(kern_r, above)
            ts_d, tsr_d = _median_time(scan_f, us, h0), _median_time(scan_r, above)  # XLA's default (TF32)
            line += (
                f" | {tk * 1e3:.3f} | {ts_hi * 1e3:.3f} | {ts_d * 1e3:.3f} | {ts_d / tk:.2f}x | {tkr * 1e3:.3f} | "
                f"{tsr_hi * 1e3:.3f} | {tsr_d * 1e3:.3f} | {tsr_d / tkr:.2f}x |"
            )
        else:
            line += " | | | | | | | | |"
        print(line, flush=True)

    print(
        "| T, B, N1 | dtype | warps | fwd err vs scan | rev err vs scan | fwd compile s | fwd kernel ms | "
        "fwd scan ms (highest) | fwd scan ms (default) | scan(default)/kernel | rev kernel ms | rev scan ms (highest) "
        "| rev scan ms (default) | rev scan(default)/kernel |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    todo = [(s, jnp.float32, None, True) for s in shapes]
    todo += [(warps_shape, jnp.float32, w, True) for w in (4, 8)]
    todo += [((8, 2, 8), jnp.float64, None, False)]
    for shape, dtype, warps, time_it in todo:
        try:
            with jax.enable_x64(dtype == jnp.float64):
                case(*shape, dtype, warps, time_it)
        except Exception as e:  # report and go on: the point is to see every failure in one run
            msg = " ".join(str(e).split())[:600]
            print(f"| {shape} | {jnp.dtype(dtype).name} | {warps or 'default'} | FAILED: {type(e).__name__}: {msg} |")
            import traceback

            traceback.print_exc(limit=6)
            sys.stdout.flush()


def _sweep_case(t_len, b, n1, warps):
    """(kernels s, scan unroll=1 s, scan unroll=8 s, max rel err of the kernels) for one shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bptt_jax.core import forward, kernels
    from bptt_jax.core.cells import elman
    from bptt_jax.core.params import LayerParams

    rng = np.random.RandomState(0)
    f = lambda *s: jnp.asarray(rng.randn(*s), jnp.float32)
    w11, us, h0, above = f(n1, n1) / np.sqrt(n1), f(t_len, b, n1), f(b, n1), f(t_len, b, n1)
    valid = jnp.ones((t_len, b), bool)
    layer = LayerParams(jnp.eye(n1), w11, jnp.zeros(n1))

    def by_scan(u, a, unroll):
        hs = forward.unroll_layer(layer, "tanh", u, h0, valid, unroll=unroll)
        return hs, elman.reverse_recurrence(w11, "tanh", hs, a, valid, None, unroll=unroll)[:2]

    def by_kernels(u, a):
        hs = kernels._call_forward(w11, "tanh", u, h0, valid, num_warps=warps)
        dz, dh_m1, _ = kernels._call_reverse(w11, "tanh", hs, a, valid, jnp.zeros_like(h0), num_warps=warps)
        return hs, (dz, dh_m1)

    k = jax.jit(by_kernels)
    s1 = jax.jit(lambda u, a: by_scan(u, a, 1))
    s8 = jax.jit(lambda u, a: by_scan(u, a, 8))
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda u, a: by_scan(u, a, 1))(us, above)
    got = k(us, above)
    err = max(
        float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
    )
    tk, t1, t8 = (_median_time(fn, us, above, rounds=10) for fn in (k, s1, s8))
    return tk, t1, t8, err


def part_sweep(quick: bool) -> None:
    """Both recurrences (forward, then reverse) by the kernels and by the scans, over B and N1 at one
    T: where the kernels win, for the rule that "auto" follows on a GPU."""
    t_len = 8 if quick else 500
    grid = [(b, n1, None) for b in ((1, 3) if quick else (1, 16, 64)) for n1 in ((8,) if quick else (32, 64, 128))]
    grid += [(3, 8, 8)] if quick else [(16, 64, 8), (16, 128, 8)]
    print(f"T = {t_len}, tanh, float32; times are forward + reverse recurrence, medians of 10; scans at XLA's default")
    print("| B | N1 | warps | kernels ms | scan unroll=1 ms | scan unroll=8 ms | best scan / kernels | max rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for b, n1, warps in grid:
        try:
            tk, t1, t8, err = _sweep_case(t_len, b, n1, warps)
            print(
                f"| {b} | {n1} | {warps or 'default'} | {tk * 1e3:.3f} | {t1 * 1e3:.3f} | {t8 * 1e3:.3f} | "
                f"{min(t1, t8) / tk:.2f}x | {err:.1e} |",
                flush=True,
            )
        except Exception as e:
            print(
                f"| {b} | {n1} | {warps or 'default'} | FAILED: {type(e).__name__}: {' '.join(str(e).split())[:300]} |"
            )


# ----------------------------------------------------------------------------- the driver


def _run(name, cmd, budget, out: Path, env) -> tuple[int | str, float]:
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=budget)
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    secs = time.perf_counter() - t0
    print(f"part {name}: exit {rc}, {secs:.0f} s of {budget:.0f} s", flush=True)
    return rc, secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the logs and summary.md")
    ap.add_argument("--quick", action="store_true", help="CPU dry run: tiny sizes, a few tests")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every time budget")
    ap.add_argument(
        "--parts", default="info,probe,sweep,tests_kernels,tests,bench,train", help="comma-separated parts, in order"
    )
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one in-process part
    args = ap.parse_args(argv)
    if args.part == "info":
        part_info()
        return 0
    if args.part == "probe":
        part_probe(args.quick)
        return 0
    if args.part == "sweep":
        part_sweep(args.quick)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.setdefault("HYPOTHESIS_PROFILE", "gpu")  # before env_tests copies env (runs 1 and 2 missed it: "ci" there)
    env.setdefault("BPTT_JAX_TEST_FAST_COMPILE", "0")  # tests/conftest.py: keep XLA's default code generation
    # The tests compile hundreds of small programs: skip XLA:GPU's GEMM autotuning there (not in the timings).
    env_tests = dict(env, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip())
    py = sys.executable
    me = str(Path(__file__).resolve())
    q = ["--quick"] if args.quick else []
    xdist = [] if args.quick else ["-n", "8"]  # compilation is CPU-bound: the GPU machine has 16 cores
    # -v: each test's outcome is logged as it ends, so a part stopped at its budget still says what passed
    pytest = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", "--durations=10", *xdist]
    commands = {
        "info": [py, me, "--out", str(out), "--part", "info"],
        "probe": [py, me, "--out", str(out), "--part", "probe", *q],
        "sweep": [py, me, "--out", str(out), "--part", "sweep", *q],
        "tests_kernels": pytest
        + (
            ["tests/test_kernels.py", "-k", "resolve or loss_with_kernels"] if args.quick else ["tests/test_kernels.py"]
        ),
        "tests": pytest + (["tests/test_scan.py", "-k", "t1_equals"] if args.quick else GPU_TESTS),
        "bench": [
            py,
            "benchmarks/bptt_speed.py",
            "--kernels",
            "--gpu-set",
            "--skip-long",
            "--cell",
            "elman",
            "--out",
            str(out / "bptt_speed.md"),
        ]
        + q,
        "train": [py, "benchmarks/train_speed.py", "--no-torch-compile", "--out", str(out / "train_speed.md")] + q,
        "tests_cells": pytest
        + (["tests/test_cells.py", "-k", "python_loop"] if args.quick else ["tests/test_cells.py"]),
        "bench_cells": [
            py,
            "benchmarks/bptt_speed.py",
            "--cell",
            "gru",
            "--cell",
            "lstm",
            "--no-torch-compile",
            "--rounds",
            "1" if args.quick else "5",
            "--out",
            str(out / "cells_speed.md"),
        ]
        + q,
        "train_gru": [py, "benchmarks/train_speed.py", "--cell", "gru", "--no-torch-compile"]
        + (q if args.quick else ["--steps", "100", "--rounds", "2"])
        + ["--out", str(out / "train_gru.md")],
        "train_lstm": [py, "benchmarks/train_speed.py", "--cell", "lstm", "--no-torch-compile"]
        + (q if args.quick else ["--steps", "100", "--rounds", "2"])
        + ["--out", str(out / "train_lstm.md")],
        "precision": [py, "benchmarks/precision.py", "--torch", "--out", str(out / "precision.md")]
        + (["--quick", "--cell", "gru"] if args.quick else ["--rounds", "5"]),
        "tests_new": pytest + (["tests/test_precision.py", "-k", "fixed_problem"] if args.quick else NEW_TESTS),
        "tune": [py, "benchmarks/tune_speed.py", "--cell", "lstm", "--out", str(out / "tune.md")]
        + (["--quick", "--budget", "5"] if args.quick else ["--budget", "8", "--rounds", "5"]),
        "adding": [py, "experiments/adding.py", "--models", "irnn,lstm0,lstm1,gru", "--out", str(out / "adding")]
        + (
            ["--lengths", "6", "--seeds", "0", "--steps", "2", "--jobs", "2", "--set", "model.hidden_sizes=[4]"]
            + ["--set", "data.test_size=4", "--set", "train.eval_every=1", "--set", "data.batch_size=2"]
            if args.quick
            else ["--lengths", "200,400", "--seeds", "0,1,2", "--jobs", "24", "--budget", str(ADDING_RUN_S)]
            + ["--stop-below", "0.005"]
        ),
    }
    unknown = [n for n in args.parts.split(",") if n not in commands]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; known: {list(commands)}")
    results = {}
    for name in args.parts.split(","):
        part_env = env_tests if name.startswith("tests") and not args.quick else env
        results[name] = _run(name, commands[name], BUDGETS[name] * args.scale, out, part_env)
    lines = ["# GPU check", "", "| part | exit | seconds | budget s |", "|---|---|---|---|"]
    for name, (rc, secs) in results.items():
        lines.append(f"| {name} | {rc} | {secs:.0f} | {BUDGETS[name] * args.scale:.0f} |")
    for name in (
        "bptt_speed.md",
        "train_speed.md",
        "cells_speed.md",
        "train_gru.md",
        "train_lstm.md",
        "precision.md",
        "tune.md",
        "adding/results.md",
    ):
        p = out / name
        if p.exists():
            lines += ["", p.read_text(encoding="utf-8")]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:8]))
    return 0 if all(rc == 0 for rc, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
