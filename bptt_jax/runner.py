"""One training run from a config: the loop, logging, evaluation, checkpoints, plots and summary.

Writes into the output directory:
  config.toml     the resolved config (after --set overrides)
  metrics.jsonl   one JSON object per logged step
  last.ckpt       the latest state (every train.checkpoint_every steps, at the end, on Ctrl-C and SIGTERM)
  best.ckpt       the state with the lowest validation loss so far
  summary.json    final figures; loss.png and dh_norms.png; sample.txt for text tasks
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax import checkpoint, data, parallel, train
from bptt_jax.config import Config, load_config, to_toml
from bptt_jax.params import RNNSpec


class RunError(RuntimeError):
    """The run cannot start or had to stop (message says why)."""


EXIT_SIGNAL = 128 + signal.SIGTERM  # 143: the exit status of a run stopped by SIGTERM (state saved)


def check_destination(path, flag: str = "--out") -> Path:
    """``path`` as a directory a run can write into, else RunError naming the problem: an existing
    file in its place or among its parents, or a folder in which nothing can be created. Probes
    with a temporary file (removed at once); creates nothing else."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunError(f"{flag}: {p} exists and is not a directory")
    base = p
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise RunError(f"{flag}: {p} cannot be created: {base} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise RunError(f"{flag}: cannot write into {base} ({e.strerror or e})") from None
    return p


class _Stop:
    """A stop request by signal. In a one-process run SIGTERM sets a flag that the loop reads after
    each step; in a multi-process run JAX's preemption notifier owns SIGTERM and every process
    stops at the step ``reached_preemption_sync_point`` agrees on. While the final state is saved,
    ``deferred()`` holds off SIGINT and SIGTERM too (they are remembered, not acted on)."""

    def __init__(self):
        self.requested = False
        self._distributed = jax.process_count() > 1
        self._main_thread = threading.current_thread() is threading.main_thread()
        self._old = None

    def _note(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if self._main_thread and not self._distributed:
            self._old = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def reached(self, step: int) -> bool:
        """True when the run should stop before the next step (every process calls it each step)."""
        if self._distributed:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    @contextlib.contextmanager
    def deferred(self):
        if not self._main_thread:
            yield
            return
        names = [signal.SIGINT] if self._distributed else [signal.SIGINT, signal.SIGTERM]
        old = {s: signal.signal(s, self._note) for s in names}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _unroll(cfg) -> int | None:
    """train.unroll as the library takes it: None for "auto" (picked by backend), else the int."""
    return None if cfg.train.unroll == "auto" else int(cfg.train.unroll)


def build(cfg: Config):
    """The task, spec and optimizer a config describes."""
    task = data.make_task(cfg.data, cfg.train.seed, cfg.train.stateful)
    spec = RNNSpec(
        task.input_size,
        cfg.model.hidden_sizes,
        task.output_size,
        activation=cfg.model.activation,
        output_activation=task.output_activation,
        divergence=task.divergence,
        bidirectional=cfg.model.bidirectional,
        merge=cfg.model.merge,
        cell=cfg.model.cell,
    )
    optimizer = train.make_optimizer(cfg.optim, cfg.train.steps)
    return task, spec, optimizer


def initial_state(cfg: Config, spec: RNNSpec, optimizer) -> train.TrainState:
    return train.init_state(
        jax.random.key(cfg.train.seed),
        spec,
        optimizer,
        cfg.data.batch_size,
        scheme=cfg.model.init,
        scale=cfg.model.init_scale,
        forget_bias=cfg.model.forget_bias,
    )


def _bits(task: data.Task, nats: float) -> float | None:
    return nats / math.log(2) if task.name in ("text", "infill") else None


def run(
    cfg: Config, out_dir, *, resume: bool = False, log: Callable[[str], None] = print, progress: bool | None = None
) -> dict:
    """Trains one run; returns the summary (also written to out_dir/summary.json).

    Raises RunError when out_dir already holds a run and resume is False, or when
    train.max_nonfinite non-finite updates come in a row.
    """
    out = check_destination(out_dir)
    last_path, best_path = out / "last.ckpt", out / "best.ckpt"
    if not resume and (last_path.exists() or (out / "metrics.jsonl").exists()):
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not last_path.exists():
        raise RunError(f"--resume: {last_path} does not exist")
    if cfg.train.num_processes > 1 or os.environ.get("BPTT_JAX_COORDINATOR"):
        parallel.initialize_distributed(
            cfg.train.coordinator_address, cfg.train.num_processes, cfg.train.process_id, cfg.train.peer_timeout_s
        )
    # None in a one-process run
    watch = parallel.watch_peers(cfg.train.peer_timeout_s, note=f"the last checkpoint is {last_path}")
    try:
        with _Stop() as stop:
            result = _run(cfg, out, last_path, best_path, stop, resume=resume, log=log, progress=progress)
    except BaseException as e:
        if watch is not None:
            if not isinstance(e, (RunError, KeyboardInterrupt)):
                # A collective whose peer is gone fails here before the watch has noticed; the watch
                # then names the lost peer and ends this process, instead of a traceback.
                watch.explain()
            watch.done(error=f"{type(e).__name__}: {e}")
        raise
    if watch is not None:
        watch.done()
    return result


def _run(cfg: Config, out: Path, last_path: Path, best_path: Path, stop: _Stop, *, resume: bool, log, progress) -> dict:
    main = parallel.is_main_process()  # only process 0 writes into the run directory
    if not main:
        log = lambda msg: None  # noqa: E731  (its output would repeat process 0's)
    task, spec, optimizer = build(cfg)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg), encoding="utf-8")

    state = initial_state(cfg, spec, optimizer)
    best_val, elapsed_before = math.inf, 0.0
    if resume:
        saved_batch = checkpoint.read_header(last_path).get("metadata", {}).get("global_batch_size")
        if saved_batch is not None and saved_batch != cfg.data.batch_size:
            raise RunError(
                f"--resume: {last_path} was written with a global batch of {saved_batch} sequences, the config "
                f"asks for data.batch_size = {cfg.data.batch_size}; the carried states and the data order need "
                "the same global batch (the number of processes and devices may change)"
            )
        state, meta = checkpoint.load(last_path, state)
        best_val, elapsed_before = meta.get("best_val", math.inf), meta.get("elapsed_s", 0.0)
        if main:
            _truncate_metrics(out / "metrics.jsonl", int(state.step))
        log(f"resumed from {last_path} at step {int(state.step)}")

    step_fn = _make_step(cfg, spec, optimizer, task)
    eval_fn = train.make_eval_step(spec, unroll=_unroll(cfg))
    if hasattr(step_fn, "mesh"):  # data-parallel: evaluation is split along B too
        eval_fn = parallel.make_sharded_eval(eval_fn, step_fn.mesh)
    t = cfg.train
    use_bar = sys.stdout.isatty() if progress is None else progress
    bar = None
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=int(state.step), unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    recent, last_dh, last_log_t, last_log_step = [], None, start, int(state.step)
    stop_reason = "steps"

    def elapsed():
        return elapsed_before + time.perf_counter() - start

    meta_common = {"global_batch_size": cfg.data.batch_size, "processes": jax.process_count()}

    def save_last():
        host_state = parallel.host_tree(state)  # gathers the carry: every process takes part
        if main:
            meta = {"best_val": best_val, "elapsed_s": elapsed(), "step": int(host_state.step), **meta_common}
            checkpoint.save(last_path, host_state, metadata=meta)

    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8") if main else None
    try:
        step = int(state.step)  # a Python mirror of state.step: no device read to steer the loop
        while step < t.steps:
            if stop.reached(step):
                stop_reason = "signal"
                break
            if t.time_limit_s and elapsed() >= t.time_limit_s:
                stop_reason = "time_limit"
                break
            batch = task.train_batch(step)
            state, m = step_fn(state, batch)
            recent.append((m.loss, float(np.sum(batch.weights)) / batch.xs.shape[1]))  # (DIV, weight per sequence)
            # The one read of a device value per step: the stop rule needs the count of non-finite
            # updates in a row (the jitted step already kept them out of the parameters).
            if int(parallel.host_value(state.nonfinite_in_row)) >= t.max_nonfinite:
                stop_reason = "nonfinite"
                break
            step += 1
            if step % t.log_every == 0 or step == t.steps or step % t.eval_every == 0:
                losses = [float(parallel.host_value(l)) / max(w, 1e-12) for l, w in recent]
                finite_losses = [x for x in losses if math.isfinite(x)]
                train_loss = float(np.mean(finite_losses)) if finite_losses else math.nan
                recent = []
                last_dh = parallel.host_value(m.dh_norms)
                now = time.perf_counter()
                row = {
                    "step": step,
                    "loss": train_loss,
                    "grad_norm": float(parallel.host_value(m.grad_norm)),
                    "seconds": round(elapsed(), 3),
                    "steps_per_s": (step - last_log_step) / max(now - last_log_t, 1e-9),
                    "skipped": int(parallel.host_value(state.nonfinite_total)),
                }
                last_log_t, last_log_step = now, step
                if _bits(task, train_loss) is not None:
                    row["bits_per_char"] = _bits(task, train_loss)
                if step % t.eval_every == 0 or step == t.steps:
                    ev = train.evaluate(eval_fn, state.params, spec, task.eval_batches, stateful=task.stateful)
                    row["val_loss"] = ev["loss"]
                    if _bits(task, ev["loss"]) is not None:
                        row["val_bits_per_char"] = _bits(task, ev["loss"])
                    if task.divergence == "cross_entropy":
                        row["val_accuracy"] = ev["accuracy"]
                    if t.stop_below and ev["loss"] < t.stop_below:
                        stop_reason = "stop_below"
                    if ev["loss"] < best_val:
                        best_val = ev["loss"]
                        best_params = parallel.host_tree(state.params)
                        if main:
                            meta = {"step": step, "val_loss": best_val, **meta_common}
                            checkpoint.save(best_path, best_params, metadata=meta)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{row.get('val_loss', float('nan')):.4f}")
                else:
                    log(msg)
            if bar is not None:
                bar.update(1)
            if step % t.checkpoint_every == 0:
                save_last()
            if stop_reason == "stop_below":
                break
    except KeyboardInterrupt:
        with stop.deferred():
            save_last()
        log(f"interrupted: state saved to {last_path} at step {step}; continue with --resume")
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()
    with stop.deferred():  # a second signal during the save waits for it
        save_last()
    if stop_reason == "signal":
        log(f"stopped by SIGTERM: state saved to {last_path} at step {step}; continue with --resume")
    host_state = parallel.host_tree(state)
    if stop_reason == "nonfinite":
        raise RunError(
            f"stopped at step {int(host_state.step)}: {t.max_nonfinite} non-finite losses or gradients in a row "
            f"(train.max_nonfinite); none reached the parameters. Lower optim.learning_rate or enable clipping. "
            f"The last good state is in {last_path}"
        )
    if not main:
        return {
            "task": task.name,
            "steps": int(host_state.step),
            "stopped_by": stop_reason,
            "process": jax.process_index(),
        }
    return finish(cfg, out, task, spec, host_state, best_val, elapsed(), last_dh, stop_reason, log)


def load_run(run_dir, which: str = "best") -> tuple:
    """A finished or interrupted run's (cfg, task, spec, params, checkpoint path): the weights of
    best.ckpt (``which="best"``; last.ckpt when no evaluation has written best.ckpt yet) or of
    last.ckpt (``which="last"``: the latest state, e.g. the last good one of a run that diverged)."""
    if which not in ("best", "last"):
        raise ValueError(f"checkpoint: expected 'best' or 'last', got {which!r}")
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    task, spec, optimizer = build(cfg)
    path = run_dir / "best.ckpt"
    if which == "best" and path.exists():
        params, _ = checkpoint.load(path, initial_state(cfg, spec, optimizer).params)
    else:
        path = run_dir / "last.ckpt"
        state, _ = checkpoint.load(path, initial_state(cfg, spec, optimizer))
        params = state.params
    return cfg, task, spec, params, path


def _make_step(cfg: Config, spec, optimizer, task):
    kwargs = dict(
        grad=cfg.train.grad,
        stateful=task.stateful,
        input_dropout=cfg.train.input_dropout,
        output_dropout=cfg.train.output_dropout,
        seed=cfg.train.seed,
        unroll=_unroll(cfg),
        recurrence=cfg.train.recurrence,
    )
    if cfg.train.devices != "1":
        return parallel.make_sharded_train_step(spec, optimizer, cfg.train.devices, cfg.data.batch_size, **kwargs)
    return train.make_train_step(spec, optimizer, **kwargs)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric rows past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    rows = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def finish(cfg, out: Path, task, spec, state, best_val, seconds, last_dh, stop_reason, log) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    summary = {
        "task": task.name,
        "steps": int(state.step),
        "seconds": round(seconds, 2),
        "stopped_by": stop_reason,
        "skipped_updates": int(state.nonfinite_total),
        "best_val_loss": best_val,
        "final_val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
        "baseline": task.baseline,
        "grad": cfg.train.grad,
        "spec": {
            "input_size": spec.input_size,
            "hidden_sizes": list(spec.hidden_sizes),
            "output_size": spec.output_size,
            "bidirectional": spec.bidirectional,
            "cell": spec.cell,
        },
    }
    if task.name in ("text", "infill") and math.isfinite(best_val):
        summary["best_val_bits_per_char"] = best_val / math.log(2)
    if task.name == "infill":
        summary["best_val_accuracy"] = max((r.get("val_accuracy", 0.0) for r in rows), default=0.0)
    if last_dh is not None:
        summary["dh_norms_last"] = np.asarray(last_dh).tolist()
    # A run stopped by a signal saves no sample: a preempted job has seconds left, not minutes.
    if task.name == "text" and (out / "best.ckpt").exists() and stop_reason != "signal":
        params, _ = checkpoint.load(out / "best.ckpt", state.params)
        text = sample_text(
            params,
            spec,
            task.vocab,
            prime=None,
            length=cfg.output.sample_length,
            temperature=cfg.output.temperature,
            seed=cfg.train.seed,
        )
        (out / "sample.txt").write_text(text, encoding="utf-8")
        summary["sample"] = text
        log("sample from the best checkpoint:\n" + text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if cfg.output.plots:
        plot(out, rows, last_dh, task, spec.state_labels())
    return summary


def sample_text(params, spec, vocab: data.Vocab, *, prime, length: int, temperature: float, seed: int) -> str:
    """``prime`` followed by ``length`` sampled characters; prime None starts from a newline (or
    the vocabulary's first character when the text has no newline)."""
    from bptt_jax import generate

    if not prime:
        prime = "\n" if "\n" in vocab.chars else vocab.chars[0]
    unknown = sorted({c for c in prime if c not in vocab.chars})
    if unknown:
        raise RunError(f"--prime: characters not in the model's vocabulary: {unknown!r}")
    xs = jnp.asarray(data.one_hot(vocab.encode(prime), len(vocab.chars)))[:, None, :]
    ids = generate.sample_ids(jax.random.key(seed), params, spec, xs, length, temperature)
    return prime + vocab.decode(np.asarray(ids))


def plot(out: Path, rows, last_dh, task, labels=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    scale = (1 / math.log(2)) if task.name in ("text", "infill") else 1.0
    unit = "bits per character" if scale != 1.0 else "loss"
    ax.plot(steps, [r["loss"] * scale for r in rows], label="training")
    val = [(r["step"], r["val_loss"] * scale) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    if last_dh is not None and np.all(np.isfinite(last_dh)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for j in range(last_dh.shape[1]):
            label = labels[j] if labels is not None else f"entry {j}"  # "layer 1 forward", ...
            ax.semilogy(np.maximum(last_dh[:, j], 1e-30), label=label)
        ax.set_xlabel("t")
        ax.set_ylabel("mean ||dDIV/dh(t)||")
        ax.set_title("gradient reaching h(t), last logged batch")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "dh_norms.png", dpi=100)
        plt.close(fig)
