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

from bptt_jax.command import data
from bptt_jax.command.config import Config, load_config, to_toml
from bptt_jax.command.report import RunError, finish
from bptt_jax.core.params import RNNSpec
from bptt_jax.training import checkpoint, parallel, train

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
        compute_dtype=None if cfg.model.compute_dtype == "float32" else cfg.model.compute_dtype,
    )
    optimizer = train.make_optimizer(cfg.optim, cfg.train.steps)
    return task, spec, optimizer


def tune_plan(cfg: Config, *, time_budget: float = 60.0, progress: bool = True):
    """``bptt_jax.tune`` for the ``bptt`` call this config's train step makes (the same network,
    per-device batch, weights, lengths, dropout mask and diagnostics), so that the run (and every
    later run of the same shapes on this machine) traces the fastest plan measured here. Returns
    the plan; raises RunError where the run does not use the explicit BPTT."""
    from bptt_jax.core.tune import tune

    if cfg.train.grad != "bptt":
        raise RunError(
            f"train.grad = {cfg.train.grad!r}: only the explicit BPTT (train.grad = 'bptt') has plans to tune"
        )
    task, spec, optimizer = build(cfg)
    params = initial_state(cfg, spec, optimizer).params
    batch = task.train_batch(0)
    shards = len(parallel.select_devices(cfg.train.devices)) if cfg.train.devices != "1" else 1
    local = max(cfg.data.batch_size // shards, 1)  # the batch one device's step sees
    cut = lambda a, axis: None if a is None else jax.lax.slice_in_dim(jnp.asarray(a), 0, local, axis=axis)  # noqa: E731
    xs = jax.lax.slice_in_dim(jnp.asarray(batch.xs), 0, local, axis=1)
    mask = None
    if cfg.train.output_dropout > 0.0:
        mask = jax.ShapeDtypeStruct((xs.shape[0], local, spec.merged_size(spec.num_layers - 1)), xs.dtype)
    return tune(
        params,
        spec,
        xs,
        cut(batch.targets, 1),
        weights=cut(batch.weights, 1),
        lengths=cut(batch.lengths, 0),
        output_mask=mask,
        diagnostics=True,
        unroll=_unroll(cfg),
        recurrence=cfg.train.recurrence,
        max_memory=cfg.train.max_memory or None,
        time_budget=time_budget,
        progress=progress,
    )


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
    train.max_nonfinite non-finite updates come in a row. With ``resume``, a directory without
    last.ckpt (a run stopped before its first checkpoint, or no run at all) starts from step 0.
    """
    out = check_destination(out_dir)
    last_path = out / "last.ckpt"
    if not resume and (last_path.exists() or (out / "metrics.jsonl").exists()):
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.train.num_processes > 1 or os.environ.get("BPTT_JAX_COORDINATOR"):
        parallel.initialize_distributed(
            cfg.train.coordinator_address, cfg.train.num_processes, cfg.train.process_id, cfg.train.peer_timeout_s
        )
    # None in a one-process run
    watch = parallel.watch_peers(cfg.train.peer_timeout_s, note=f"the last checkpoint is {last_path}")
    try:
        with _Stop() as stop:
            result = _Run(cfg, out, stop, log).train(resume=resume, progress=progress)
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


class _Run:
    """One run while it trains, in the parts a reader follows: ``resume``, the loop (``train``),
    ``log_row`` and ``evaluate``, ``save_last`` (checkpoints; signals are ``_Stop``'s)."""

    def __init__(self, cfg: Config, out: Path, stop: _Stop, log: Callable[[str], None]):
        self.cfg, self.out, self.stop = cfg, out, stop
        self.last_path, self.best_path = out / "last.ckpt", out / "best.ckpt"
        self.main = parallel.is_main_process()  # only process 0 writes into the run directory
        self.log = log if self.main else (lambda msg: None)  # other processes would repeat process 0's output
        if cfg.train.tune:
            if jax.process_count() == 1:
                tune_plan(cfg, progress=self.main)
            else:
                self.log("train.tune: skipped in a run of several processes (run `bptt-jax tune CONFIG` first)")
        self.task, self.spec, optimizer = build(cfg)
        self.state = initial_state(cfg, self.spec, optimizer)
        self.best_val: float = math.inf
        self.elapsed_before, self.start, self.step = 0.0, time.perf_counter(), 0
        self.step_fn = _make_step(cfg, self.spec, optimizer, self.task)
        self.eval_fn = train.make_eval_step(self.spec, unroll=_unroll(cfg))
        if hasattr(self.step_fn, "mesh"):  # data-parallel: evaluation is split along B too
            self.eval_fn = parallel.make_sharded_eval(self.eval_fn, self.step_fn.mesh)
        self.meta_common = {"global_batch_size": cfg.data.batch_size, "processes": jax.process_count()}
        self.recent: list = []  # (DIV, weight per sequence) of the steps since the last logged row
        self.last_dh: np.ndarray | None = None
        self.last_log: tuple[float, int] = (self.start, 0)  # (time, step) of the last logged row

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def resume(self) -> None:
        """Continues from last.ckpt. A directory without one (a run stopped before its first
        checkpoint, or none at all) starts from step 0, saying so: a job script that always passes
        --resume, as a preemptible job does, never gets stuck."""
        if not self.last_path.exists():
            if (self.out / "metrics.jsonl").exists():
                self.log(
                    f"--resume: {self.last_path} does not exist (stopped before its first checkpoint): from step 0"
                )
                if self.main:
                    _truncate_metrics(self.out / "metrics.jsonl", 0)
            else:
                self.log(f"--resume: no run in {self.out} yet: a new run")
            return
        saved_batch = checkpoint.read_header(self.last_path).get("metadata", {}).get("global_batch_size")
        if saved_batch is not None and saved_batch != self.cfg.data.batch_size:
            raise RunError(
                f"--resume: {self.last_path} was written with a global batch of {saved_batch} sequences, the config "
                f"asks for data.batch_size = {self.cfg.data.batch_size}; the carried states and the data order need "
                "the same global batch (the number of processes and devices may change)"
            )
        self.state, meta = checkpoint.load(self.last_path, self.state)
        self.best_val, self.elapsed_before = meta.get("best_val", math.inf), meta.get("elapsed_s", 0.0)
        if self.main:
            _truncate_metrics(self.out / "metrics.jsonl", int(self.state.step))
        self.log(f"resumed from {self.last_path} at step {int(self.state.step)}")

    def save_last(self) -> None:
        host_state = parallel.host_tree(self.state)  # gathers the carry: every process takes part
        if self.main:
            meta = {"best_val": self.best_val, "elapsed_s": self.elapsed(), "step": int(host_state.step)}
            checkpoint.save(self.last_path, host_state, metadata={**meta, **self.meta_common})

    def evaluate(self, step: int, row: dict[str, float | int | None]) -> bool:
        """Adds the validation figures to ``row``; keeps best.ckpt. True when train.stop_below is reached."""
        ev = train.evaluate(
            self.eval_fn, self.state.params, self.spec, self.task.eval_batches, stateful=self.task.stateful
        )
        row["val_loss"] = ev["loss"]
        if _bits(self.task, ev["loss"]) is not None:
            row["val_bits_per_char"] = _bits(self.task, ev["loss"])
        if self.task.divergence == "cross_entropy":
            row["val_accuracy"] = ev["accuracy"]
        if ev["loss"] < self.best_val:
            self.best_val = ev["loss"]
            best_params = parallel.host_tree(self.state.params)
            if self.main:
                meta = {"step": step, "val_loss": self.best_val, **self.meta_common}
                checkpoint.save(self.best_path, best_params, metadata=meta)
        return bool(self.cfg.train.stop_below and ev["loss"] < self.cfg.train.stop_below)

    def log_row(self, step: int, m, metrics_file, bar) -> bool:
        """One metrics row (train loss since the last row; validation at eval steps), written and
        shown. True when the validation loss reached train.stop_below."""
        losses = [float(parallel.host_value(l)) / max(w, 1e-12) for l, w in self.recent]
        finite_losses = [x for x in losses if math.isfinite(x)]
        train_loss = float(np.mean(finite_losses)) if finite_losses else math.nan
        self.recent, self.last_dh = [], parallel.host_value(m.dh_norms)
        now = time.perf_counter()
        row: dict[str, float | int | None] = {
            "step": step,
            "loss": train_loss,
            "grad_norm": float(parallel.host_value(m.grad_norm)),
            "seconds": round(self.elapsed(), 3),
            "steps_per_s": (step - self.last_log[1]) / max(now - self.last_log[0], 1e-9),
            "skipped": int(parallel.host_value(self.state.nonfinite_total)),
        }
        self.last_log = (now, step)
        if _bits(self.task, train_loss) is not None:
            row["bits_per_char"] = _bits(self.task, train_loss)
        stop_below = False
        if step % self.cfg.train.eval_every == 0 or step == self.cfg.train.steps:
            stop_below = self.evaluate(step, row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{row.get('val_loss', float('nan')):.4f}")
        else:
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return stop_below

    def loop(self, metrics_file, bar) -> str:
        """The training steps from ``self.step`` on; returns why the loop stopped."""
        t = self.cfg.train
        while self.step < t.steps:
            if self.stop.reached(self.step):
                return "signal"
            if t.time_limit_s and self.elapsed() >= t.time_limit_s:
                return "time_limit"
            batch = self.task.train_batch(self.step)
            self.state, m = self.step_fn(self.state, batch)
            self.recent.append((m.loss, float(np.sum(batch.weights)) / batch.xs.shape[1]))
            # The one read of a device value per step: the stop rule needs the count of non-finite
            # updates in a row (the jitted step already kept them out of the parameters).
            if int(parallel.host_value(self.state.nonfinite_in_row)) >= t.max_nonfinite:
                return "nonfinite"
            self.step += 1
            step = self.step
            stop_below = False
            if step % t.log_every == 0 or step == t.steps or step % t.eval_every == 0:
                stop_below = self.log_row(step, m, metrics_file, bar)
            if bar is not None:
                bar.update(1)
            if step % t.checkpoint_every == 0:
                self.save_last()
            if stop_below:
                return "stop_below"
        return "steps"

    def train(self, *, resume: bool, progress: bool | None) -> dict:
        """Resume (or start), the loop, the final checkpoint and the summary."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(to_toml(self.cfg), encoding="utf-8")
        if resume:
            self.resume()
        self.step = int(self.state.step)  # a Python mirror of state.step: no device read to steer the loop
        self.start = time.perf_counter()
        self.last_log = (self.start, self.step)
        use_bar = sys.stdout.isatty() if progress is None else progress
        bar = None
        if use_bar:
            from tqdm import tqdm

            bar = tqdm(total=self.cfg.train.steps, initial=self.step, unit="step", dynamic_ncols=True)
        metrics_file = open(self.out / "metrics.jsonl", "a", encoding="utf-8") if self.main else None
        try:
            stop_reason = self.loop(metrics_file, bar)
        except KeyboardInterrupt:
            with self.stop.deferred():
                self.save_last()
            self.log(f"interrupted: state saved to {self.last_path} at step {self.step}; continue with --resume")
            raise
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if bar is not None:
                bar.close()
        with self.stop.deferred():  # a second signal during the save waits for it
            self.save_last()
        if stop_reason == "signal":
            self.log(f"stopped by SIGTERM: state saved to {self.last_path} at step {self.step}; continue with --resume")
        host_state = parallel.host_tree(self.state)
        if stop_reason == "nonfinite":
            raise RunError(
                f"stopped at step {int(host_state.step)}: {self.cfg.train.max_nonfinite} non-finite losses or "
                "gradients in a row (train.max_nonfinite); none reached the parameters. Lower "
                f"optim.learning_rate or enable clipping. The last good state is in {self.last_path}"
            )
        if not self.main:
            return {
                "task": self.task.name,
                "steps": int(host_state.step),
                "stopped_by": stop_reason,
                "process": jax.process_index(),
            }
        args = (self.best_val, self.elapsed(), self.last_dh, stop_reason, self.log)
        return finish(self.cfg, self.out, self.task, self.spec, host_state, *args)


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
        max_memory=cfg.train.max_memory or None,
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
