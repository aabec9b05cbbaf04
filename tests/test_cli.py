"""The bptt-jax command end to end on tiny configs; resume bit-identity; every shipped config runs."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bptt_jax.command import cli, data, runner
from bptt_jax.command.config import load_config
from bptt_jax.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.joinpath("configs").glob("*.toml"))
TINY = [
    "model.hidden_sizes=[8]",
    "data.seq_len=8",
    "data.batch_size=2",
    "data.adding_length=10",
    "data.test_size=4",
    "train.steps=2",
    "train.log_every=1",
    "train.eval_every=2",
    "train.checkpoint_every=1",
    "train.time_limit_s=0",
    "output.sample_length=5",
    "output.plots=false",
]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_runs_two_steps(path, tmp_path):
    cfg = load_config(path, TINY)
    if cfg.data.task == "arrays":  # its file is made by experiments/make_arrays.py: a small one here
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "experiments/make_arrays.py"),
                "--out",
                str(tmp_path / "a.npz"),
                "--sequences",
                "20",
            ],
            check=True,
            capture_output=True,
        )
        cfg = load_config(path, [*TINY, f"data.path={(tmp_path / 'a.npz').as_posix()}"])
    summary = runner.run(cfg, tmp_path / "run", log=lambda s: None, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["best_val_loss"])
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "val_loss" in rows[1]


@pytest.mark.parametrize("path", ["min_char_rnn.toml", "char_lm_lstm.toml"])  # GRU: the core property tests
def test_bfloat16_training_through_the_command(path, tmp_path, capsys):
    """--set model.compute_dtype=bfloat16 trains (float32 parameters and optimizer state), and its
    first loss is the float32 run's to bfloat16's rounding."""
    losses = {}
    for cd in ("float32", "bfloat16"):
        out = tmp_path / cd
        args = ["run", str(ROOT / "configs" / path), "--out", str(out), *(f"--set={s}" for s in TINY)]
        assert cli.main([*args, f"--set=model.compute_dtype={cd}"]) == 0
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        losses[cd] = rows[0]["loss"]
        assert np.isfinite(rows[-1]["loss"])
        cfg = load_config(ROOT / "configs" / path, [*TINY, f"model.compute_dtype={cd}"])
        state, _ = checkpoint.load(out / "last.ckpt", runner.initial_state(cfg, *runner.build(cfg)[1:]))
        assert {a.dtype for a in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
    assert losses["bfloat16"] != losses["float32"]
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.02 * losses["float32"]
    capsys.readouterr()


def _tiny_text_config(tmp_path, extra=()):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        f"[data]\ncorpus = 'file'\npath = '{text.as_posix()}'\nseq_len = 8\nbatch_size = 2\n"
        "[model]\nhidden_sizes = [8]\n"
        "[train]\nsteps = 6\nlog_every = 1\neval_every = 3\ncheckpoint_every = 2\ninput_dropout = 0.1\noutput_dropout = 0.1\n"
        "[output]\nsample_length = 10\nplots = true\n"
    )
    return cfg


def test_run_then_sample_then_gradcheck(tmp_path, capsys):
    cfg = _tiny_text_config(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["run", str(cfg), "--out", str(out)]) == 0
    for name in (
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "last.ckpt",
        "best.ckpt",
        "loss.png",
        "dh_norms.png",
        "sample.txt",
    ):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and "best_val_bits_per_char" in summary
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "bits_per_char", "grad_norm", "seconds"} <= set(rows[0])
    capsys.readouterr()
    assert cli.main(["sample", str(out), "--prime", "the ", "--length", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the ") and len(text.rstrip("\n")) >= 24
    assert cli.main(["gradcheck", str(cfg)]) == 0
    assert "largest relative difference, explicit BPTT vs jax.grad" in capsys.readouterr().out
    # A second run into the same directory is refused (nothing overwritten).
    assert cli.main(["run", str(cfg), "--out", str(out)]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_gradcheck_fails_above_tolerance(tmp_path, capsys):
    cfg = _tiny_text_config(tmp_path)
    assert cli.main(["gradcheck", str(cfg), "--tolerance", "0"]) in (0, 1)
    result = cli.gradcheck(load_config(cfg), tolerance=-1.0)
    assert not result["ok"]


def test_config_error_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearnin_rate = 1\n")
    assert cli.main(["run", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg = load_config(_tiny_text_config(tmp_path), ["output.plots=false"])
    runner.run(cfg, tmp_path / "a", log=lambda s: None, progress=False)
    whole, _ = checkpoint.load(tmp_path / "a" / "last.ckpt", runner.initial_state(cfg, *runner.build(cfg)[1:]))

    real = data.make_task

    def interrupting(*args, **kwargs):  # Ctrl-C when the batch for step 3 is requested, once
        task = real(*args, **kwargs)
        fired = []

        def batch(step):
            if step == 3 and not fired:
                fired.append(1)
                raise KeyboardInterrupt
            return task.train_batch(step)

        return task._replace(train_batch=batch)

    monkeypatch.setattr(data, "make_task", interrupting)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, tmp_path / "b", log=lambda s: None, progress=False)
    monkeypatch.setattr(data, "make_task", real)
    state, meta = checkpoint.load(tmp_path / "b" / "last.ckpt", whole)
    assert int(state.step) == 3
    runner.run(cfg, tmp_path / "b", resume=True, log=lambda s: None, progress=False)
    resumed, _ = checkpoint.load(tmp_path / "b" / "last.ckpt", whole)
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, monkeypatch):
    # A job script that always passes --resume (a preemptible job) must never be stuck: a run killed
    # before its first checkpoint (metrics.jsonl, no last.ckpt) starts again from step 0, and an
    # empty or missing directory starts a new run; either ends where an uninterrupted run ends.
    cfg = load_config(_tiny_text_config(tmp_path), ["output.plots=false", "train.checkpoint_every=4"])
    quiet = lambda s: None
    runner.run(cfg, tmp_path / "a", log=quiet, progress=False)
    template = runner.initial_state(cfg, *runner.build(cfg)[1:])
    whole, _ = checkpoint.load(tmp_path / "a" / "last.ckpt", template)

    real = data.make_task

    def crashing(*args, **kwargs):  # dies at step 3 without saving anything, as SIGKILL would
        task = real(*args, **kwargs)

        def batch(step):
            if step == 3:
                raise RuntimeError("killed")
            return task.train_batch(step)

        return task._replace(train_batch=batch)

    monkeypatch.setattr(data, "make_task", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        runner.run(cfg, tmp_path / "b", log=quiet, progress=False)
    monkeypatch.setattr(data, "make_task", real)
    assert (tmp_path / "b" / "metrics.jsonl").exists() and not (tmp_path / "b" / "last.ckpt").exists()
    with pytest.raises(runner.RunError, match="already holds a run"):
        runner.run(cfg, tmp_path / "b", log=quiet, progress=False)
    said: list[str] = []
    runner.run(cfg, tmp_path / "b", resume=True, log=said.append, progress=False)
    assert any("does not exist" in s and "from step 0" in s for s in said), said
    (tmp_path / "c").mkdir()  # empty
    for fresh in (tmp_path / "c", tmp_path / "d"):  # empty, missing
        said.clear()
        runner.run(cfg, fresh, resume=True, log=said.append, progress=False)
        assert any("a new run" in s for s in said), said
    for run_dir in ("b", "c", "d"):
        got, _ = checkpoint.load(tmp_path / run_dir / "last.ckpt", template)
        for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(got)):
            np.testing.assert_array_equal(a, b)
        steps = [json.loads(l)["step"] for l in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6], (run_dir, steps)


def test_corrupt_checkpoint_is_not_resumed(tmp_path):
    cfg = load_config(_tiny_text_config(tmp_path), ["output.plots=false"])
    runner.run(cfg, tmp_path / "a", log=lambda s: None, progress=False)
    path = tmp_path / "a" / "last.ckpt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        runner.run(cfg, tmp_path / "a", resume=True, log=lambda s: None, progress=False)


def test_nonfinite_run_stops_with_message(tmp_path):
    cfg = load_config(
        _tiny_text_config(tmp_path),
        [
            "optim.learning_rate=1e30",
            "optim.clip='none'",
            "model.activation='identity'",
            "optim.name='sgd'",
            "train.max_nonfinite=2",
            "train.steps=50",
            "output.plots=false",
        ],
    )
    with pytest.raises(runner.RunError, match=r"2 non-finite losses or gradients in a row"):
        runner.run(cfg, tmp_path / "a", log=lambda s: None, progress=False)
    state, _ = checkpoint.load(tmp_path / "a" / "last.ckpt", runner.initial_state(cfg, *runner.build(cfg)[1:]))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(state.params))


def test_bad_data_files_fail_clearly_and_write_nothing(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[data]\ncorpus = 'file'\npath = '{empty.as_posix()}'\n")
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 1
    assert f"data.path: '{empty.as_posix()}' is empty" in capsys.readouterr().err
    cfg.write_text("[data]\ncorpus = 'file'\npath = '{}'\n".format((tmp_path / "missing.txt").as_posix()))
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 1
    assert "data.path: no such file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_with_another_global_batch_is_refused(tmp_path):
    """The checkpoint records the global batch size; a resume with another one is refused by name."""
    path = ROOT / "configs" / "min_char_rnn.toml"
    runner.run(load_config(path, TINY), tmp_path / "a", log=lambda s: None, progress=False)
    meta = checkpoint.read_header(tmp_path / "a" / "last.ckpt")["metadata"]
    assert meta["global_batch_size"] == 2 and meta["processes"] == 1
    cfg = load_config(path, TINY + ["data.batch_size=4", "train.steps=3"])
    with pytest.raises(runner.RunError, match=r"written with a global batch of 2 sequences.*data.batch_size = 4"):
        runner.run(cfg, tmp_path / "a", resume=True, log=lambda s: None, progress=False)


def test_tune_then_run_traces_the_tuned_plan(tmp_path, monkeypatch, capsys):
    """bptt-jax tune caches a plan under the key of the train step's own bptt call (the same
    per-device batch, dropout mask and diagnostics): a run of the config then traces that plan."""
    from bptt_jax.core import gradient, plan, plancache

    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path / "cache"))
    gradient._compiled.cache_clear()
    seen = []
    resolve = plan.resolve
    monkeypatch.setattr(plan, "resolve", lambda *a, **k: seen.append(resolve(*a, **k)) or seen[-1])
    cfg = _tiny_text_config(tmp_path)
    assert cli.main(["tune", str(cfg), "--time-budget", "0"]) == 0
    assert "plan: block_size=" in capsys.readouterr().out
    path = tmp_path / "cache" / plancache.FILE
    (key, entry), *more = json.loads(path.read_text())["entries"].items()
    assert not more and json.loads(key)["work"]["diagnostics"] is True
    entry.update(block_size=3, gates="recompute", unroll=2)  # an unusual plan: T = 8 padded to 9
    assert plancache.record(key, entry)
    gradient._compiled.cache_clear()
    seen.clear()
    assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), "--set=output.plots=false"]) == 0
    assert (seen[0].block, seen[0].unroll) == (3, 2)
    # train.tune = true tunes before training: the entry, deleted, is measured and recorded again
    path.unlink()
    out = tmp_path / "run2"
    assert cli.main(["run", str(cfg), "--out", str(out), "--set=train.tune=true", "--set=output.plots=false"]) == 0
    assert list(json.loads(path.read_text())["entries"]) == [key]
    assert cli.main(["tune", str(cfg), "--set=train.grad=autodiff"]) == 1
    assert "only the explicit BPTT" in capsys.readouterr().err
    # a memory budget through the command: the run trains; a budget nothing fits stops with its size
    out = tmp_path / "run3"
    assert (
        cli.main(["run", str(cfg), "--out", str(out), "--set=train.max_memory=64MiB", "--set=output.plots=false"]) == 0
    )
    bad = ["run", str(cfg), "--out", str(tmp_path / "run4"), "--set=train.max_memory=100", "--set=output.plots=false"]
    assert cli.main(bad) == 1
    assert "no plan of this gradient fits" in capsys.readouterr().err
    gradient._compiled.cache_clear()
