"""Speed and memory of the explicit BPTT against autodiff and PyTorch, measured side by side.

    python benchmarks/bptt_speed.py [--quick] [--rounds R] [--out FILE] [--cell elman|gru|lstm ...]

One unit of work: forward + loss + gradients of all parameters, jitted, block_until_ready, float32;
one layer (tanh Elman, GRU or LSTM: ``--cell``, all three by default; the gated cells' contenders are
in ``gated.py``); softmax + cross-entropy summed over t and averaged over the batch. All contenders run
in ONE process, each round in a fresh random order after a warm-up; medians of the timed rounds are
reported (a sample of a contender whose call lasts under 4 ms is the mean of several calls:
``round_robin``).
Only ratios measured side by side mean anything on a shared machine.
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

import jax
import jax.numpy as jnp
import numpy as np

import bptt_jax as bj
from bptt_jax.core import kernels as bj_kernels
from bptt_jax.core import plancache, tune

SHAPES = [
    (50, 1, 32, 64, 32),
    (100, 32, 64, 128, 64),
    (200, 64, 128, 256, 128),
    (1000, 16, 64, 128, 64),
    (100, 128, 512, 1024, 512),
]
LONG = [(1000, 16, 64, 128, 64), (10000, 16, 64, 128, 64)]
QUICK_SHAPES = [(8, 2, 4, 8, 4), (12, 3, 5, 6, 7)]
GPU_EXTRA_SHAPES = [(1000, 1, 32, 64, 32), (1000, 64, 128, 256, 128)]  # issue 10's GPU table adds these
QUICK_LONG = [(40, 2, 4, 8, 4)]
GATED_SHAPES = [
    (50, 1, 32, 64, 32),
    (100, 32, 64, 128, 64),
    (200, 64, 128, 256, 128),
    (1000, 16, 64, 128, 64),
    (100, 64, 256, 512, 256),
]
CELLS = ("elman", "gru", "lstm")


# ----------------------------------------------------------------------------- contenders (JAX)


def _ce(z2s, targets):
    logp = jax.nn.log_softmax(z2s, -1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)) / z2s.shape[1]


def naive_loss(params, xs, targets):
    """What most users write: the whole step (projection, recurrence, readout, loss) in the body."""
    layer, ro = params.layers[0], params.readout

    def body(carry, inp):
        h, total = carry
        x_t, d_t = inp
        h = jnp.tanh(x_t @ layer.w1 + h @ layer.w11 + layer.b1)
        z2 = h @ ro.w2 + ro.b2
        logp = jax.nn.log_softmax(z2, -1)
        total = total - jnp.sum(jnp.take_along_axis(logp, d_t[:, None], -1))
        return (h, total), None

    h0 = jnp.zeros((xs.shape[1], layer.w11.shape[0]), xs.dtype)
    (_, total), _ = jax.lax.scan(body, (h0, jnp.zeros((), xs.dtype)), (xs, targets))
    return total / xs.shape[1]


def hoisted_loss(params, xs, targets, unroll):
    """Input projection before the scan, readout and loss after it, only the recurrence inside."""
    layer, ro = params.layers[0], params.readout
    us = xs @ layer.w1 + layer.b1

    def body(h, u_t):
        h = jnp.tanh(u_t + h @ layer.w11)
        return h, h

    h0 = jnp.zeros((xs.shape[1], layer.w11.shape[0]), xs.dtype)
    _, hs = jax.lax.scan(body, h0, us, unroll=unroll)
    return _ce(hs @ ro.w2 + ro.b2, targets)


def jax_contenders(spec, kernels=False, gpu_set=False):
    """Jitted by ``compile_jax``. "bptt" is the default call exactly as the README calls it, inside an
    outer ``jax.jit``; the same call made directly (no outer jit) is timed as "bptt (direct call)".
    With ``kernels``: the scans and the Pallas kernels forced, side by side (on a GPU "auto" picks the
    kernels where they apply; on a CPU "pallas" is interpret mode, for smoke tests only)."""
    c = {
        "bptt": lambda p, x, d: bj.bptt(p, spec, x, d),
        "grad(loss)": jax.value_and_grad(lambda p, x, d: bj.loss(p, spec, x, d)),
    }
    if not gpu_set:
        c["grad(naive scan)"] = jax.value_and_grad(naive_loss)
    for u in (4, 8) if gpu_set else (1, 4, 8):
        c[f"grad(hoisted, unroll={u})"] = jax.value_and_grad(lambda p, x, d, u=u: hoisted_loss(p, x, d, u))
    if kernels:
        c["bptt recurrence=scan"] = lambda p, x, d: bj.bptt(p, spec, x, d, recurrence="scan")
        if bj_kernels.unsupported_reason(spec.hidden_sizes, jnp.float32) is None:
            c["bptt recurrence=pallas"] = lambda p, x, d: bj.bptt(p, spec, x, d, recurrence="pallas")
    if gpu_set:  # the scans' settings a GPU may want: more steps per loop iteration, one block
        c["bptt scan unroll=8"] = lambda p, x, d: bj.bptt(p, spec, x, d, recurrence="scan", unroll=8)
        c["bptt scan unroll=8 block_size=T"] = lambda p, x, d: bj.bptt(
            p, spec, x, d, recurrence="scan", unroll=8, block_size=x.shape[0]
        )
    return c


def flax_contender(spec):
    try:
        import flax.linen as nn
    except Exception:
        return None

    class Model(nn.Module):
        hidden: int
        out: int

        @nn.compact
        def __call__(self, xs_bt):  # flax RNN is batch-major
            hs = nn.RNN(nn.SimpleCell(self.hidden))(xs_bt)
            return nn.Dense(self.out)(hs)

    model = Model(spec.hidden_sizes[0], spec.output_size)

    def to_flax(p):  # map our params onto flax's SimpleCell (i: input kernel+bias, h: recurrent kernel)
        layer, ro = p.layers[0], p.readout
        return {
            "params": {
                "SimpleCell_0": {"i": {"kernel": layer.w1, "bias": layer.b1}, "h": {"kernel": layer.w11}},
                "Dense_0": {"kernel": ro.w2, "bias": ro.b2},
            }
        }

    def loss(fp, xs, targets):
        z2 = model.apply(fp, jnp.swapaxes(xs, 0, 1))
        return _ce(jnp.swapaxes(z2, 0, 1), targets)

    def from_flax(g):
        c, dense = g["params"]["SimpleCell_0"], g["params"]["Dense_0"]
        return bj.RNNParams(
            (bj.LayerParams(c["i"]["kernel"], c["h"]["kernel"], c["i"]["bias"]),),
            (),
            bj.ReadoutParams(dense["kernel"], dense["bias"]),
        )

    return jax.value_and_grad(loss), to_flax, from_flax


# ----------------------------------------------------------------------------- PyTorch


def torch_contender(spec, params, xs, targets, threads, compiled=False):
    """nn.RNN + Linear, eager or under ``torch.compile``: ``gated.torch_contender`` for the Elman cell
    (None when torch, or compilation, is unavailable). Returns (run, grads, note)."""
    return _gated().torch_contender("elman", spec, params, xs, targets, threads, compiled=compiled)


def _gated():
    """The sibling module gated.py (the gated cells' contenders), also when this file is loaded by path."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import gated

    return gated


# ----------------------------------------------------------------------------- measuring


def max_rel_err(a, b) -> float:
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            raise AssertionError(f"shapes differ: {x.shape} and {y.shape}")
        if y.size:  # an empty leaf (the Elman cell's empty gate cache) has nothing to differ
            worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


def compile_jax(fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    arg = getattr(mem, "argument_size_in_bytes", float("nan")) if mem is not None else float("nan")
    return compiled, seconds, temp, arg


def matmul_throughput(rounds: int, n: int = 2048) -> float:
    """FLOP/s of a large jitted float32 matmul, median of rounds."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(max(rounds, 3)):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def pass_flops(t, b, n, n1, m) -> float:
    """Matmul FLOPs of forward + backward of one tanh layer + readout (no gradient w.r.t. X):
    forward 2TB(N N1 + N1^2 + N1 M); backward twice that, less the 2TB N N1 of dX."""
    fwd = 2 * t * b * (n * n1 + n1 * n1 + n1 * m)
    return 3 * fwd - 2 * t * b * n * n1


def round_robin(runners: dict, rounds: int, warmup: int = 2, cpu: dict | None = None) -> dict:
    """Median seconds per call of each contender. Each round takes one sample of every contender, in
    a fresh random order (seeded): a fixed cyclic order would always put the same contender right
    after PyTorch, whose OpenMP threads keep spinning for a while after a call. (A sleep before each
    call was tried and dropped: it measures wake-up from idle, inflating small shapes several
    times.) A sample is one call, or for a contender whose last warm-up call took less than
    ``tune.SAMPLE_S`` the mean of as many calls, each waited for, as make about that long (at most
    ``tune.MAX_REPS``; the rule ``bptt_jax.tune`` times plans by): at (50, 1, 32, 64, 32), whose calls
    take 0.1-0.2 ms, single calls made the Elman cell's plan 0.76-0.93x the best ``jax.grad``
    contender in three 7-round runs of tune_speed.py (results/tune_speed_elman_*_s19_spr.md), and
    1.12-1.16x with this rule (results/tune_speed_elman_*_s21*_spr.md). With ``cpu`` (a dict), also
    the median processor time per call (``time.process_time``: every thread of this process) into
    ``cpu[name]``: over the wall time, how many cores a call kept busy."""
    names = list(runners)
    last = {}
    for _ in range(warmup):
        for name in names:
            t0 = time.perf_counter()
            runners[name]()
            last[name] = time.perf_counter() - t0
    reps = {name: int(min(tune.MAX_REPS, max(1, tune.SAMPLE_S // max(last.get(name, 1.0), 1e-9)))) for name in names}
    rng = random.Random(0)
    times = {name: [] for name in names}
    busy = {name: [] for name in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(reps[name]):
                runners[name]()
            times[name].append((time.perf_counter() - t0) / reps[name])
            busy[name].append((time.process_time() - c0) / reps[name])
    if cpu is not None:
        cpu.update({name: statistics.median(v) for name, v in busy.items()})
    return {name: statistics.median(v) for name, v in times.items()}


def _block(out):
    jax.tree_util.tree_map(lambda a: a.block_until_ready(), out)


def bench_shape(shape, rounds, threads, flops_per_s, kernels=False, gpu_set=False, torch_compiled=True):
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m)
    key = jax.random.key(0)
    params = bj.init_params(key, spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    runners, info = {}, {}
    ref_value, ref_grads = None, None
    for name, fn in jax_contenders(spec, kernels, gpu_set).items():
        compiled, secs, temp, arg = compile_jax(fn, params, xs, targets)
        value, grads = compiled(params, xs, targets)[:2]
        if ref_grads is None:
            ref_value, ref_grads = value, grads
        info[name] = {
            "compile_s": secs,
            "temp": temp,
            "arg": arg,
            "err": max_rel_err((value, grads), (ref_value, ref_grads)),
        }
        runners[name] = lambda c=compiled: _block(c(params, xs, targets))
    direct = lambda: bj.bptt(params, spec, xs, targets)  # the call a user makes, no outer jit
    t0 = time.perf_counter()
    value, grads, _ = direct()
    _block(grads)
    info["bptt (direct call)"] = {
        "compile_s": time.perf_counter() - t0,
        "temp": info["bptt"]["temp"],
        "arg": info["bptt"]["arg"],
        "err": max_rel_err((value, grads), (ref_value, ref_grads)),
    }
    runners["bptt (direct call)"] = lambda: _block(direct())
    fl = None if gpu_set else flax_contender(spec)
    if fl is not None:
        vg, to_flax, from_flax = fl
        fp = to_flax(params)
        compiled, secs, temp, arg = compile_jax(vg, fp, xs, targets)
        value, g = compiled(fp, xs, targets)
        info["flax RNN(SimpleCell)"] = {
            "compile_s": secs,
            "temp": temp,
            "arg": arg,
            "err": max_rel_err((value, from_flax(g)), (ref_value, ref_grads)),
        }
        runners["flax RNN(SimpleCell)"] = lambda c=compiled: _block(c(fp, xs, targets))
    torch_modes = ((False, "torch nn.RNN"), (True, "torch.compile nn.RNN"))
    torch_modes = torch_modes[:1] if gpu_set or not torch_compiled else torch_modes
    for compiled, name in torch_modes:
        t0 = time.perf_counter()
        tc = torch_contender(spec, params, xs, targets, threads, compiled=compiled)
        if tc is None:
            continue
        run, grads, _ = tc
        info[name] = {
            "compile_s": time.perf_counter() - t0 if compiled else float("nan"),
            "temp": float("nan"),
            "arg": float("nan"),
            "err": max_rel_err(grads(), ref_grads),
        }
        runners[name] = run
    med = round_robin(runners, rounds)
    roofline = pass_flops(t, b, n, n1, m) / flops_per_s
    return med, info, roofline


def bench_long(shape, rounds, ks):
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    runners, info = {}, {}
    ref = None
    for k in (None,) + tuple(ks):
        name = "bptt" if k is None else f"bptt checkpoint_every={k}"
        fn = lambda p, x, d, k=k: bj.bptt(p, spec, x, d, checkpoint_every=k)[:2]
        compiled, secs, temp, arg = compile_jax(fn, params, xs, targets)
        out = compiled(params, xs, targets)
        ref = out if ref is None else ref
        info[name] = {"compile_s": secs, "temp": temp, "err": max_rel_err(out, ref)}
        runners[name] = lambda c=compiled: _block(c(params, xs, targets))
    return round_robin(runners, rounds), info


def bench_dispatch(shape, rounds):
    """The default bptt call three ways, alone (no other contender between them): made directly,
    inside an outer ``jax.jit``, and through the outer jit's ahead-of-time compiled executable.
    Returns median seconds. In the full table a dozen contenders run between these calls (PyTorch's
    threads, flax), which moves their ratio by tens of percent from run to run."""
    t, b, n, n1, m = shape
    spec = bj.RNNSpec(n, (n1,), m)
    params = bj.init_params(jax.random.key(0), spec)
    xs = jax.random.normal(jax.random.key(1), (t, b, n), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (t, b), 0, m)
    f = lambda p, x, d: bj.bptt(p, spec, x, d)
    jitted = jax.jit(f)
    compiled = jax.jit(f).lower(params, xs, targets).compile()
    runners = {
        "direct call": lambda: _block(bj.bptt(params, spec, xs, targets)),
        "outer jax.jit": lambda: _block(jitted(params, xs, targets)),
        "outer jit, compiled": lambda: _block(compiled(params, xs, targets)),
    }
    return round_robin(runners, rounds)


def dispatch_lines(shapes, rounds):
    lines = [
        "## The direct call against the same call inside an outer jax.jit (alone)",
        "",
        f"{rounds} rounds, only these three contenders, random order per round, medians.",
        "",
        "| T, B, N, N1, M | direct ms | outer jax.jit ms | outer compiled ms | direct / outer compiled |",
        "|---|---|---|---|---|",
    ]
    for shape in shapes:
        med = bench_dispatch(shape, rounds)
        d, j, c = med["direct call"], med["outer jax.jit"], med["outer jit, compiled"]
        lines.append(f"| {shape} | {d * 1e3:.3f} | {j * 1e3:.3f} | {c * 1e3:.3f} | {d / c:.2f} |")
    return lines + [""]


def fmt_bytes(x):
    if x != x:
        return "n/a"
    return f"{x / 2**20:.2f} MiB"


def gated_lines(cell, shapes, rounds, threads, flops_per_s, lines, out=None, torch_compiled=True):
    """Appends one table per shape and a summary for a gated cell to ``lines`` (written to ``out``
    after every shape)."""
    import types

    tools = types.SimpleNamespace(
        compile_jax=compile_jax, max_rel_err=max_rel_err, round_robin=round_robin, block=_block
    )
    summary, geo = [], []
    for shape in shapes:
        med, info, roofline = _gated().bench_shape(cell, shape, rounds, threads, flops_per_s, tools, torch_compiled)
        autodiff = [k for k in med if k.startswith("grad(") or k.startswith("flax")]
        grads_only = [k for k in autodiff if k.startswith("grad(")]
        best_ad = min(autodiff, key=lambda k: med[k])
        best_grad = min(grads_only, key=lambda k: med[k])
        direct = med["bptt (direct call)"]
        others = [k for k in med if not k.startswith("bptt")]
        best_other = min(others, key=lambda k: med[k])
        smallest = min(grads_only, key=lambda k: info[k]["temp"])
        torch_names = [k for k in med if "torch" in k]
        geo.append(med[best_grad] / direct)
        summary.append(
            (
                shape,
                med[best_grad] / direct,
                best_grad,
                med[best_other] / direct,
                best_other,
                min(direct, med["bptt"]),
                info["bptt"]["temp"] / info[smallest]["temp"],
                info[smallest]["temp"],
                {k: med[k] / direct for k in torch_names},
            )
        )
        lines += [
            f"## {cell.upper()}: T, B, N, N1, M = {shape}",
            "",
            "| contender | median ms | vs best autodiff | x roofline | compile s | temp mem | arg mem | "
            "grad rel. err vs bptt | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, v in sorted(med.items(), key=lambda kv: kv[1]):
            i = info[k]
            lines.append(
                f"| {k} | {v * 1e3:.3f} | {v / med[best_ad]:.2f} | {v / roofline:.2f} | {i['compile_s']:.2f} | "
                f"{fmt_bytes(i['temp'])} | {fmt_bytes(i['arg'])} | {i['err']:.1e} | {i.get('note', '')} |"
            )
        lines += [
            "",
            f"best jax.grad contender: {best_grad}; the direct bptt call's speed-up over it: "
            f"{med[best_grad] / direct:.2f}x; over the fastest other contender ({best_other}): "
            f"{med[best_other] / direct:.2f}x; direct call / outer-jitted call: {direct / med['bptt']:.2f}",
            "",
        ]
        if out:
            with open(out, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
    lines += [
        f"## {cell.upper()} summary (the direct `bptt(params, spec, xs, targets)` call)",
        "",
        f"Geometric mean speed-up over the best `jax.grad` contender: {float(np.exp(np.mean(np.log(geo)))):.2f}x",
        "",
        "| T, B, N, N1, M | over best jax.grad (which) | over fastest other (which) | "
        "temp mem / smallest jax.grad temp (its temp) | over torch (eager, compiled) |",
        "|---|---|---|---|---|",
    ]
    for shape, ad, ad_name, other, other_name, _, mem, small, tr in summary:
        torch_txt = ", ".join(f"{v:.2f}x" for v in tr.values()) or "n/a"
        lines.append(
            f"| {shape} | {ad:.2f}x ({ad_name}) | {other:.2f}x ({other_name}) | {mem:.2f} ({fmt_bytes(small)}) | "
            f"{torch_txt} |"
        )
    lines.append("")
    return lines


def _report(lines, out=None) -> str:
    """Prints the report and writes it to ``out`` (when given); returns it."""
    report = "\n".join(lines)
    print(report)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(report + "\n")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, quick 2)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cores)")
    ap.add_argument("--skip-long", action="store_true", help="skip the checkpoint_every table")
    ap.add_argument("--dispatch-only", action="store_true", help="only the direct-call vs outer-jit table")
    ap.add_argument(
        "--gpu-set",
        action="store_true",
        help="the GPU check's contenders: bptt (default, scans, kernels), grad(loss), grad(hoisted, unroll 1 and "
        "4), torch nn.RNN eager (cuDNN on a GPU); no naive scan, flax or torch.compile",
    )
    ap.add_argument(
        "--precision",
        choices=("default", "highest"),
        default="default",
        help="float32 matmul precision: 'default' is each library's own (TF32 on NVIDIA GPUs for XLA and cuDNN); "
        "'highest' pins full float32 in JAX and turns TF32 off in torch",
    )
    ap.add_argument(
        "--kernels",
        action="store_true",
        default=None,
        help="add bptt with recurrence='scan' and 'pallas' side by side (default: on a GPU only)",
    )
    ap.add_argument(
        "--cell",
        action="append",
        choices=CELLS,
        help="the cell(s) to measure (repeatable; default all three). The dispatch, kernel, GPU and long-sequence "
        "tables are the Elman cell's",
    )
    ap.add_argument("--no-torch-compile", action="store_true", help="PyTorch eager only (no torch.compile contenders)")
    args = ap.parse_args(argv)
    cells = tuple(args.cell) if args.cell else CELLS
    rounds = args.rounds or (2 if args.quick else 10)
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")  # a benchmark script, not the library
        try:
            import torch

            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        except Exception:
            pass
    on_gpu = jax.default_backend() == "gpu"
    kernels = on_gpu if args.kernels is None else args.kernels
    shapes = QUICK_SHAPES if args.quick else SHAPES + (GPU_EXTRA_SHAPES if on_gpu else [])
    longs = QUICK_LONG if args.quick else LONG
    flops_per_s = matmul_throughput(rounds, 256 if args.quick else 2048)
    lines = [
        f"# bptt_jax benchmark ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {plancache.describe_host()} ({platform.machine()}), {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}, python {platform.python_version()}; "
        f"command: `python benchmarks/bptt_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"{rounds} timed rounds, a fresh random order each round, medians; float32 matmul precision: "
        f"{args.precision}.",
        "",
        f"Large float32 matmul throughput measured in this run: {flops_per_s / 1e9:.1f} GFLOP/s "
        "(the roofline divides each pass's matmul FLOPs by it).",
        "",
    ]
    if args.dispatch_only:
        return _report(lines + dispatch_lines(shapes, max(rounds, 41 if not args.quick else rounds)), args.out)
    geo, summary = [], []
    for shape in shapes if "elman" in cells else []:
        med, info, roofline = bench_shape(
            shape, rounds, args.threads, flops_per_s, kernels, args.gpu_set, not args.no_torch_compile
        )
        autodiff = [k for k in med if k.startswith("grad(") or k.startswith("flax")]
        best_ad = min(autodiff, key=lambda k: med[k])
        torch_names = [k for k in med if "torch" in k]
        torch_t = med["torch nn.RNN"] if "torch nn.RNN" in med else None
        direct = med["bptt (direct call)"]
        others = [k for k in med if not k.startswith("bptt")]
        best_other = min(others, key=lambda k: med[k])
        geo.append(med[best_ad] / direct)
        summary.append(
            (
                shape,
                med[best_ad] / direct,
                best_other,
                med[best_other] / direct,
                direct / med["bptt"],
                info["bptt"]["temp"] / min(info[k]["temp"] for k in autodiff),
                direct / roofline,
                {k: med[k] / direct for k in torch_names},
                (
                    med["bptt recurrence=scan"] / med["bptt recurrence=pallas"],
                    (torch_t / med["bptt recurrence=pallas"]) if torch_t else float("nan"),
                )
                if "bptt recurrence=pallas" in med
                else None,
            )
        )
        lines += [
            f"## T, B, N, N1, M = {shape}",
            "",
            "| contender | median ms | vs best autodiff | vs torch | x roofline | compile s | temp mem | arg mem | grad rel. err vs bptt |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, v in sorted(med.items(), key=lambda kv: kv[1]):
            i = info[k]
            lines.append(
                f"| {k} | {v * 1e3:.3f} | {v / med[best_ad]:.2f} | "
                f"{(v / torch_t) if torch_t else float('nan'):.2f} | {v / roofline:.2f} | "
                f"{i['compile_s']:.2f} | {fmt_bytes(i['temp'])} | {fmt_bytes(i['arg'])} | {i['err']:.1e} |"
            )
        lines += [
            "",
            f"best autodiff: {best_ad}; the direct bptt call's speed-up over it: {med[best_ad] / direct:.2f}x; "
            f"over the fastest other contender ({best_other}): {med[best_other] / direct:.2f}x; direct call / "
            f"outer-jitted call: {direct / med['bptt']:.2f}" + ("" if torch_names else "; torch not installed"),
            "",
        ]
        if args.out:  # what is measured so far survives a run stopped at its time limit
            with open(args.out, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
    for cell in cells:
        if cell != "elman":
            shapes_g = QUICK_SHAPES[1:] if args.quick else GATED_SHAPES  # quick: N, N1, M all different
            gated_lines(cell, shapes_g, rounds, args.threads, flops_per_s, lines, args.out, not args.no_torch_compile)
    if "elman" not in cells:
        return _report(lines, args.out)
    lines += [
        f"Geometric mean speed-up of the direct bptt call over the best autodiff contender: "
        f"{float(np.exp(np.mean(np.log(geo)))):.2f}x",
        "",
        "## Summary (the direct `bptt(params, spec, xs, targets)` call)",
        "",
        "| T, B, N, N1, M | speed-up over best autodiff | speed-up over fastest other (which) | direct / outer jit time | "
        "temp mem / smallest autodiff temp | x roofline | speed-up over torch (eager, compiled) | "
        "kernels: speed-up over the scans, over torch eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, ad, other, other_ratio, dj, mem, roof, tr, kr in summary:
        torch_txt = ", ".join(f"{v:.2f}x" for v in tr.values()) or "n/a"
        kern_txt = f"{kr[0]:.2f}x, {kr[1]:.2f}x" if kr else "n/a"
        lines.append(
            f"| {shape} | {ad:.2f}x | {other_ratio:.2f}x ({other}) | {dj:.2f} | {mem:.2f} | {roof:.2f} | {torch_txt} "
            f"| {kern_txt} |"
        )
    lines.append("")
    if not args.skip_long:
        for shape in longs:
            t = shape[0]
            ks = (int(round(np.sqrt(t))),)
            med, info = bench_long(shape, rounds if t < 5000 else max(3, rounds // 3), ks)
            lines += [
                f"## Long sequences: T, B, N, N1, M = {shape}",
                "",
                "| variant | median ms | time vs plain | compile s | temp mem | temp vs plain | grad rel. err |",
                "|---|---|---|---|---|---|---|",
            ]
            for k, v in med.items():
                lines.append(
                    f"| {k} | {v * 1e3:.1f} | {v / med['bptt']:.2f} | {info[k]['compile_s']:.2f} | "
                    f"{fmt_bytes(info[k]['temp'])} | {info['bptt']['temp'] / max(info[k]['temp'], 1):.1f}x smaller | "
                    f"{info[k]['err']:.1e} |"
                )
            lines.append("")
    return _report(lines, args.out)


if __name__ == "__main__":
    main()
