"""Stopping on signals and refusing bad destinations, in one process: SIGTERM finishes the step in
flight, saves it and exits 143; a signal during the save leaves a whole checkpoint; a resumed run
equals an uninterrupted one bit for bit. Also the peer watch's answer to a failed collective and the
dropout masks' independence of the batch's split. (Several processes: tests/test_multiprocess.py.)"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bptt_jax.command import cli, data, runner
from bptt_jax.command.config import load_config
from bptt_jax.training import checkpoint, parallel, train

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, steps=6):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    path = tmp_path / "tiny.toml"
    path.write_text(
        f"[data]\ncorpus = 'file'\npath = '{text.as_posix()}'\nseq_len = 8\nbatch_size = 2\n"
        "[model]\nhidden_sizes = [8]\ncell = 'lstm'\n"
        f"[train]\nsteps = {steps}\nlog_every = 1\neval_every = 3\ncheckpoint_every = 2\n"
        "input_dropout = 0.1\noutput_dropout = 0.2\n"
        "[output]\nsample_length = 10\nplots = false\n"
    )
    return path


def _leaves(path, template):
    state, meta = checkpoint.load(path, template)
    return jax.tree_util.tree_leaves(state), meta


def _signalling_task(monkeypatch, at_step: int, signals):
    """data.make_task whose train batch for ``at_step`` first sends ``signals`` to this process, once."""
    real = data.make_task

    def make(*args, **kwargs):
        task = real(*args, **kwargs)
        fired = []

        def batch(step):
            if step == at_step and not fired:
                fired.append(1)
                for s in signals:
                    os.kill(os.getpid(), s)
            return task.train_batch(step)

        return task._replace(train_batch=batch)

    monkeypatch.setattr(data, "make_task", make)
    return real


def test_sigterm_saves_the_step_reached_and_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg = load_config(_config(tmp_path))
    template = runner.initial_state(cfg, *runner.build(cfg)[1:])
    runner.run(cfg, tmp_path / "whole", log=lambda s: None, progress=False)
    whole, _ = _leaves(tmp_path / "whole" / "last.ckpt", template)

    before = signal.getsignal(signal.SIGTERM)
    real = _signalling_task(monkeypatch, 2, [signal.SIGTERM])
    lines = []
    summary = runner.run(cfg, tmp_path / "cut", log=lines.append, progress=False)
    monkeypatch.setattr(data, "make_task", real)
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again
    # the step in flight (index 2, the third) was finished: 3 steps, not the periodic checkpoint's 2
    assert summary["stopped_by"] == "signal" and summary["steps"] == 3
    cut = tmp_path / "cut"
    _, meta = _leaves(cut / "last.ckpt", template)
    assert meta["step"] == 3
    assert lines[-1] == f"stopped by SIGTERM: state saved to {cut / 'last.ckpt'} at step 3; continue with --resume"
    assert json.loads((cut / "summary.json").read_text())["stopped_by"] == "signal"

    runner.run(cfg, cut, resume=True, log=lambda s: None, progress=False)
    resumed, _ = _leaves(cut / "last.ckpt", template)
    for a, b in zip(whole, resumed):
        np.testing.assert_array_equal(a, b)
    assert [json.loads(l)["step"] for l in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_signals_during_the_save_leave_a_whole_checkpoint(tmp_path, monkeypatch):
    # SIGTERM arrives during the periodic save at step 2; SIGINT and SIGTERM again during the final
    # save. The run stops at step 2 with a loadable last.ckpt, and no KeyboardInterrupt escapes.
    cfg = load_config(_config(tmp_path))
    template = runner.initial_state(cfg, *runner.build(cfg)[1:])
    real_save = checkpoint.save
    sent = []

    def save(path, tree, *, metadata=None):
        if Path(path).name == "last.ckpt" and len(sent) < 2:
            sent.append(metadata["step"])
            for s in [signal.SIGTERM] if len(sent) == 1 else [signal.SIGINT, signal.SIGTERM]:
                os.kill(os.getpid(), s)
            time.sleep(0.05)  # the handlers run between bytecodes: let them run inside the save
        real_save(path, tree, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save", save)
    summary = runner.run(cfg, tmp_path / "run", log=lambda s: None, progress=False)
    assert sent == [2, 2] and summary["stopped_by"] == "signal" and summary["steps"] == 2
    state, meta = checkpoint.load(tmp_path / "run" / "last.ckpt", template)
    assert int(state.step) == 2 == meta["step"]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_sigterm_to_the_command(tmp_path):
    """A real SIGTERM from outside: exit status 143, one line naming the checkpoint, at the step reached."""
    cfg_path = _config(tmp_path, steps=200000)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bptt_jax.command.cli", "run", str(cfg_path), "--out", str(out)]
    cmd += ["--set", "train.checkpoint_every=1000000", "--set", "train.eval_every=1000000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no metrics written"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == runner.EXIT_SIGNAL == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    said = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(said) == 1, stdout[-2000:]
    step = int(said[0].split(" at step ")[1].split(";")[0])
    assert said[0] == f"stopped by SIGTERM: state saved to {out / 'last.ckpt'} at step {step}; continue with --resume"
    print(f"SIGTERM to one process: stopped and saved at step {step}, exit status {proc.returncode}")
    assert step >= 5  # past the rows we waited for, and no periodic checkpoint was due (every 1000000)
    assert checkpoint.read_header(out / "last.ckpt")["metadata"]["step"] == step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and summary["steps"] == step
    assert json.loads(stdout.strip().splitlines()[-1])["stopped_by"] == "signal"


def test_unusable_destinations_are_refused_by_name(tmp_path, capsys):
    cfg = _config(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    cases = [
        (a_file, f"--out: {a_file} exists and is not a directory"),
        (a_file / "run", f"--out: {a_file / 'run'} cannot be created: {a_file} is a file, not a directory"),
        (Path("/proc/bptt_jax_run"), "--out: cannot write into /proc"),  # nothing can be created there, root or not
    ]
    for out, message in cases:
        assert cli.main(["run", str(cfg), "--out", str(out)]) == 1
        assert message in capsys.readouterr().err
        assert cli.main(["gradflow", str(cfg), "--out", str(out)]) == 1
        assert message in capsys.readouterr().err
        assert cli.main(["run", str(cfg), "--out", str(out), "--processes", "2"]) == 1
        assert message in capsys.readouterr().err
    assert a_file.read_text() == "not a directory"


class FakeStore:
    """The distributed runtime's key-value store, as PeerWatch uses it."""

    def __init__(self):
        self.kv, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            self.kv[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def test_a_failed_collective_waits_for_the_watch_to_name_the_lost_peer():
    store, exits, said = FakeStore(), [], []

    class Err:
        def write(self, s):
            said.append(s)

        def flush(self):
            pass

    watch = parallel.PeerWatch(
        0.6, 0.05, note="the last checkpoint is run/last.ckpt", exit=exits.append, stderr=Err(), client=store, me=0, n=2
    ).start()
    store.key_value_set(f"{parallel.PeerWatch.PREFIX}1", "7")  # process 1 beat once, then went silent
    t0 = time.monotonic()
    assert watch.explain()  # what the runner calls when a collective raised
    assert time.monotonic() - t0 < 0.6 + 3
    assert exits == [parallel.EXIT_PEER_LOST]
    message = "".join(said)
    assert message.startswith("error: process 1 of 2 stopped responding")
    assert message.rstrip().endswith("stopping process 0 of 2; the last checkpoint is run/last.ckpt")

    # Every peer alive: the failure is this process's own, and explain says so within its bound.
    store2 = FakeStore()
    # (a generous limit: a peer beating every 0.05 s is never 2 s late, even on a loaded machine)
    watch = parallel.PeerWatch(2.0, 0.05, exit=exits.append, stderr=Err(), client=store2, me=0, n=2).start()
    beating = threading.Event()

    def peer():
        k = 0
        while not beating.wait(0.05):
            k += 1
            store2.key_value_set(f"{parallel.PeerWatch.PREFIX}1", str(k))

    threading.Thread(target=peer, daemon=True).start()
    assert not watch.explain()
    beating.set()
    watch.done()
    assert exits == [parallel.EXIT_PEER_LOST]


@pytest.mark.parametrize("split", [2, 4])
def test_dropout_masks_do_not_depend_on_the_split(split):
    # Sequence b's mask comes from (key, its global index) alone: the masks of shards of the batch,
    # each with its own indices, are the rows of the whole batch's mask.
    key = jax.random.key(3)
    index = jnp.arange(8)
    whole = train.dropout_keep(key, index, 5, 7, 0.6)
    assert whole.shape == (5, 8, 7) and 0.4 < float(jnp.mean(whole)) < 0.8
    parts = [train.dropout_keep(key, idx, 5, 7, 0.6) for idx in jnp.split(index, split)]
    np.testing.assert_array_equal(jnp.concatenate(parts, axis=1), whole)
    # and the sequences differ from one another (not one mask repeated)
    assert not all(bool(jnp.array_equal(whole[:, 0], whole[:, b])) for b in range(1, 8))
