"""Training steps per second of a char-LM config's model: bptt-jax's train step against PyTorch.

    python benchmarks/train_speed.py [--steps S] [--rounds R] [--quick] [--out FILE] [--threads K]
                                     [--cell elman|gru|lstm | --config FILE] [--native] [--scans]

The model of ``configs/char_lm.toml`` (2 x 256 tanh, T = 64, B = 32, Adam, global-norm clipping 1,
state carried across chunks) is trained by
  (a) bptt-jax's jitted train step with grad = "bptt" (the explicit BPTT),
  (b) the same step with grad = "autodiff" (jax.value_and_grad of the loss),
  (b') with ``--native``, the step of (a) with recurrence = "native" (the cells' compiled kernel), with
      ``--scans`` with recurrence = "scan" (the rules' plan with the scans, where they run the kernel),
  (c) an equivalent PyTorch loop: nn.RNN (nn.GRU, nn.LSTM for ``--cell gru|lstm``, which take
      configs/char_lm_gru.toml, char_lm_lstm.toml) + Linear + torch.optim.Adam + clip_grad_norm_,
      threads = cores, eager and under torch.compile (skipped with a note where compilation fails).
All start from the same initial weights (exported with ``interop.to_torch_state_dict``) and read the
same batches. Like for like: output dropout is off and the learning rate constant (the config's
peak rate) for every contender, since PyTorch would draw other dropout masks. All contenders run in
ONE process: after a warm-up (compilation), each round runs ``steps / rounds`` steps of every
contender in turn (a fresh random order each round); steps/s is the median over rounds, and the training loss after
the same number of steps is reported beside it. The speed-up is also given paired: per round, the
contender's time over bptt's in that round (the two ran minutes apart at most, under the same load),
then the median and the range of those ratios over the rounds. On a shared machine the load moves
every contender's steps/s from round to round; the ratio of two medians taken from different rounds
moves with it, the paired ratio much less.
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
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bptt_jax.command import config, runner  # noqa: E402
from bptt_jax.core import plancache  # noqa: E402
from bptt_jax.layers.torch import to_torch_state_dict  # noqa: E402
from bptt_jax.training import train  # noqa: E402


def jax_contender(cfg, grad, recurrence="auto"):
    task, spec, optimizer = runner.build(cfg)
    step = train.make_train_step(spec, optimizer, grad=grad, stateful=True, seed=cfg.train.seed, recurrence=recurrence)
    state = runner.initial_state(cfg, spec, optimizer)
    box = {"state": state, "loss": float("nan")}

    def run(batches):
        s = box["state"]
        for b in batches:
            s, metrics = step(s, b)
        box["loss"] = metrics.loss
        jax.block_until_ready(s.params)
        box["state"] = s

    return run, lambda: float(box["loss"]), state.params, spec


def torch_contender(cfg, params, spec, threads, compiled):
    try:
        import torch
    except Exception:
        return None
    torch.set_num_threads(threads)
    n1 = spec.hidden_sizes
    if spec.cell == "elman":
        rnn = torch.nn.RNN(spec.input_size, n1[0], num_layers=len(n1), nonlinearity="tanh")
    else:
        rnn = getattr(torch.nn, spec.cell.upper())(spec.input_size, n1[0], num_layers=len(n1))
    model = torch.nn.ModuleDict({"rnn": rnn, "readout": torch.nn.Linear(n1[-1], spec.output_size)})
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(params, spec).items()})
    for k in range(len(n1) if spec.cell == "elman" else 0):  # nn.RNN splits b1 into bias_ih + bias_hh; Adam
        getattr(model["rnn"], f"bias_hh_l{k}").requires_grad_(False)  # would step both: keep bias_hh at 0
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine: cuDNN
    model = model.to(dev)
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.learning_rate, eps=cfg.optim.eps
    )
    clip = cfg.optim.clip_value

    def loss_fn(x, d, h0):
        out, h_last = model["rnn"](x, h0)
        z2 = model["readout"](out)
        t, b = d.shape
        return torch.nn.functional.cross_entropy(z2.reshape(t * b, -1), d.reshape(-1), reduction="sum") / b, h_last

    if compiled:
        import torch._dynamo

        torch._dynamo.config.allow_rnn = True  # else dynamo runs the recurrent layer eagerly
        loss_fn = torch.compile(loss_fn)

    def zeros():
        h = torch.zeros(len(n1), cfg.data.batch_size, n1[0], device=dev)
        return (h, h.clone()) if spec.cell == "lstm" else h  # the LSTM carries (h, c)

    box = {"h": zeros(), "loss": float("nan")}

    def one(b):
        x = torch.from_numpy(np.array(b.xs, np.float32)).to(dev)
        d = torch.from_numpy(np.array(b.targets)).long().to(dev)
        reset = torch.from_numpy(np.array(b.reset)).to(dev)
        keep = lambda h: torch.where(reset[None, :, None], torch.zeros_like(h), h)  # noqa: E731
        h0 = tuple(map(keep, box["h"])) if spec.cell == "lstm" else keep(box["h"])
        opt.zero_grad(set_to_none=True)
        loss, h_last = loss_fn(x, d, h0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        box["h"] = tuple(h.detach() for h in h_last) if spec.cell == "lstm" else h_last.detach()
        return loss

    def run(batches):
        for b in batches:
            loss = one(b)
        box["loss"] = loss.item()

    if compiled:
        try:
            snapshot = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
            one(BATCHES_FOR_COMPILE[0])  # compile now; then restore, so every contender starts equal
            model.load_state_dict(snapshot[0])
            opt.load_state_dict(snapshot[1])
            opt.state.clear()
            box["h"] = zeros()
        except Exception as e:  # no compiler toolchain, unsupported op, ...
            print(f"torch.compile unavailable, contender skipped: {type(e).__name__}: {e}", file=sys.stderr)
            return None
    return run, lambda: box["loss"]


BATCHES_FOR_COMPILE: list = []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 300; quick 6)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds the timed steps are cut into (default 6; quick 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--quick", action="store_true", help="a tiny model and few steps (smoke test)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cores)")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    ap.add_argument(
        "--cell", choices=("elman", "gru", "lstm"), help="the cell's char-LM config (configs/char_lm*.toml)"
    )
    ap.add_argument("--config", help="the model's config (default: the main job's, or --cell's)")
    ap.add_argument("--no-torch-compile", action="store_true", help="PyTorch eager only (no torch.compile)")
    ap.add_argument(
        "--native",
        action="store_true",
        help='also the bptt step with recurrence="native" (the cells\' compiled kernel)',
    )
    ap.add_argument("--scans", action="store_true", help='also the bptt step with recurrence="scan"')
    ap.add_argument(
        "--precision",
        choices=("default", "highest"),
        default="default",
        help="float32 matmul precision: 'default' is each library's own (TF32 on NVIDIA GPUs for XLA and cuDNN); "
        "'highest' pins full float32 in JAX and turns TF32 off in torch",
    )
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    steps = args.steps or (6 if args.quick else 300)
    if args.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")  # a benchmark script, not the library
        try:
            import torch

            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        except Exception:
            pass
    rounds = args.rounds or (2 if args.quick else 6)
    per_round = max(1, steps // rounds)
    overrides = ["train.output_dropout=0.0", 'optim.schedule="constant"']
    if args.quick:
        overrides += ["model.hidden_sizes=[8, 8]", "data.seq_len=8", "data.batch_size=4"]
    if args.config is None:
        args.config = str(
            ROOT / "configs" / ("char_lm.toml" if args.cell in (None, "elman") else f"char_lm_{args.cell}.toml")
        )
    cfg = config.load_config(args.config, overrides)
    if args.cell is not None and cfg.model.cell != args.cell:
        ap.error(f"--cell {args.cell}: {args.config} has model.cell = {cfg.model.cell!r}")
    task, spec, _ = runner.build(cfg)
    total = args.warmup + per_round * rounds
    batches = [task.train_batch(i) for i in range(total)]
    BATCHES_FOR_COMPILE[:] = batches[:1]

    runners, losses = {}, {}
    run, loss, params0, spec = jax_contender(cfg, "bptt")
    runners['bptt-jax, grad = "bptt"'], losses['bptt-jax, grad = "bptt"'] = run, loss
    run, loss, _, _ = jax_contender(cfg, "autodiff")
    runners['bptt-jax, grad = "autodiff"'], losses['bptt-jax, grad = "autodiff"'] = run, loss
    if args.native:
        run, loss, _, _ = jax_contender(cfg, "bptt", recurrence="native")
        runners['bptt-jax, grad = "bptt", recurrence = "native"'] = run
        losses['bptt-jax, grad = "bptt", recurrence = "native"'] = loss
    if args.scans:
        run, loss, _, _ = jax_contender(cfg, "bptt", recurrence="scan")
        runners['bptt-jax, grad = "bptt", recurrence = "scan"'] = run
        losses['bptt-jax, grad = "bptt", recurrence = "scan"'] = loss
    notes = []
    if not args.no_torch:
        modes = ((False, "PyTorch eager"),) + (() if args.no_torch_compile else ((True, "PyTorch torch.compile"),))
        for compiled, name in modes:
            tc = torch_contender(cfg, params0, spec, args.threads, compiled)
            if tc is None:
                notes.append(f"{name}: unavailable (torch missing or compilation failed), not run")
                continue
            runners[name], losses[name] = tc

    names = list(runners)
    for name in names:  # warm-up: compilation, the same first batches for everyone
        runners[name](batches[: args.warmup])
    times = {name: [] for name in names}
    rng = random.Random(0)
    for r in range(rounds):
        chunk = batches[args.warmup + r * per_round : args.warmup + (r + 1) * per_round]
        order = names[:]
        rng.shuffle(order)  # a fresh order each round: no contender always follows PyTorch's spinning threads
        for name in order:
            t0 = time.perf_counter()
            runners[name](chunk)
            times[name].append(time.perf_counter() - t0)
    sps = {name: per_round / statistics.median(v) for name, v in times.items()}
    ref = sps['bptt-jax, grad = "bptt"']
    # per round: the contender's time over bptt's in the same round (its speed-up there)
    paired = {n: sorted(t / b for t, b in zip(times[n], times['bptt-jax, grad = "bptt"'])) for n in names}
    lines = [
        f"# Training speed, the model of {Path(args.config).name} ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {plancache.describe_host()} ({platform.machine()}), {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}, python {platform.python_version()}"
        + (f", torch {__import__('torch').__version__}" if any("PyTorch" in n for n in names) else "")
        + f"; command: `python benchmarks/train_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        "",
        f"Model: {spec.hidden_sizes} {spec.activation if spec.cell == 'elman' else spec.cell.upper()}, N = M = {spec.input_size}, T = {cfg.data.seq_len}, "
        f"B = {cfg.data.batch_size}, Adam {cfg.optim.learning_rate} (constant), global-norm clip "
        f"{cfg.optim.clip_value}, carried state, no dropout, float32 matmul precision {args.precision}; "
        f"{args.warmup} warm-up steps, then {rounds} rounds "
        f"of {per_round} steps per contender, random order per round; steps/s = median over rounds; "
        "paired: per round, the contender's time over bptt's in that round, median (min-max) over the rounds.",
        "",
        "| contender | steps/s | bptt's speed-up over it | paired speed-up, median (range) | training loss after "
        f"{args.warmup + per_round * rounds} steps |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(names, key=lambda n: -sps[n]):
        r = paired[name]
        pair = f"{statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f})"
        lines.append(f"| {name} | {sps[name]:.1f} | {ref / sps[name]:.2f}x | {pair} | {losses[name]():.4f} |")
    lines += [""] + [f"Note: {n}" for n in notes] + ([""] if notes else [])
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
