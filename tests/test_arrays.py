"""data.task = "arrays": a user's .npz of sequences, its checks, and training on it."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bptt_jax as bj
from bptt_jax.command import cli, data, launch, runner
from bptt_jax.command.config import load_config

ROOT = Path(__file__).resolve().parents[1]
S, T, N = 40, 7, 3


def _example():
    spec = importlib.util.spec_from_file_location("make_arrays", ROOT / "experiments" / "make_arrays.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arrays(seed=0, **extra):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, S).astype(np.int32)
    targets = rng.integers(0, 4, (S, T)).astype(np.int32)
    targets[np.arange(T)[None, :] >= lengths[:, None]] = -100  # padding, never read
    out = {"xs": rng.standard_normal((S, T, N)).astype(np.float32), "targets": targets, "lengths": lengths}
    out.update(extra)
    return out


def _save(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _config(tmp_path, path, *sets):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"[data]\ntask = 'arrays'\npath = '{Path(path).as_posix()}'\nbatch_size = 8\nvalidation_fraction = 0.25\n"
        "[model]\nhidden_sizes = [6]\n[train]\nsteps = 3\nlog_every = 1\neval_every = 3\nstateful = false\n"
        "[output]\nplots = false\n"
    )
    return load_config(cfg, list(sets)), cfg


def test_a_file_becomes_a_task_with_sizes_taken_from_the_data(tmp_path):
    arrays = _arrays()
    cfg, _ = _config(tmp_path, _save(tmp_path, **arrays))
    task = data.make_task(cfg.data, seed=0)
    assert (task.name, task.input_size, task.output_size) == ("arrays", N, 4)
    assert (task.output_activation, task.divergence, task.stateful) == ("softmax", "cross_entropy", False)
    assert task.baseline["train_sequences"] == 30 and task.baseline["validation_sequences"] == 10
    b = task.train_batch(5)
    assert b.xs.shape == (T, 8, N) and b.targets.shape == (T, 8) and b.lengths.shape == (8,)
    # the batch is a pure function of (seed, step), and its sequences are rows of the file
    np.testing.assert_array_equal(task.train_batch(5).xs, b.xs)
    for j in range(8):
        (row,) = [i for i in range(S) if np.array_equal(arrays["xs"][i], b.xs[:, j])]
        assert b.lengths[j] == arrays["lengths"][row]
        valid = np.arange(T) < arrays["lengths"][row]
        np.testing.assert_array_equal(b.weights[:, j], valid.astype(np.float32))
        np.testing.assert_array_equal(b.targets[:, j], np.where(valid, arrays["targets"][row], 0))
    # validation: every held-out sequence once, the last batch padded with weightless ones to B
    ev = task.eval_batches
    assert [e.xs.shape[1] for e in ev] == [8, 8] and ev[-1].weights[:, 2:].sum() == 0
    seen = {tuple(e.xs[:, j].ravel()) for e in ev for j in range(8) if e.weights[:, j].sum() > 0}
    train_rows = {tuple(task.train_batch(k).xs[:, j].ravel()) for k in range(50) for j in range(8)}
    assert len(seen) == 10 and not seen & train_rows


def test_float_targets_make_a_regression_task(tmp_path):
    arrays = _arrays()
    arrays["targets"] = np.random.default_rng(1).standard_normal((S, T, 2)).astype(np.float32)
    cfg, _ = _config(tmp_path, _save(tmp_path, **arrays))
    task = data.make_task(cfg.data, seed=0)
    assert (task.output_size, task.output_activation, task.divergence) == (2, "identity", "squared_error")
    assert task.baseline["mean_guess_loss"] > 0


def test_padded_batch_loss_equals_each_sequence_alone():
    """The oracle for lengths: DIV of a padded batch (bidirectional GRU, many-to-one weights) is the
    batch mean of each sequence's DIV run alone on its valid steps, in a plain Python loop."""
    arrays = _arrays()
    last = arrays["lengths"] - 1
    weights = np.zeros((S, T), np.float32)
    weights[np.arange(S), last] = 1.0
    a = data.check_arrays(arrays | {"weights": weights})
    b = data.arrays_batch(a, np.arange(8))
    spec = bj.RNNSpec(N, (5,), 4, cell="gru", bidirectional=True)
    params = bj.init_params(jax.random.key(0), spec)
    batch_div = bj.loss(params, spec, b.xs, b.targets, weights=b.weights, lengths=b.lengths)
    alone = []
    for j in range(8):
        n = int(b.lengths[j])
        alone.append(
            bj.loss(params, spec, b.xs[:n, j : j + 1], b.targets[:n, j : j + 1], weights=b.weights[:n, j : j + 1])
        )
    np.testing.assert_allclose(float(batch_div), float(np.mean(alone)), rtol=1e-6)
    # and the explicit BPTT of the padded batch equals jax.grad of it
    _, grads, _ = bj.bptt(params, spec, jnp.asarray(b.xs), b.targets, weights=b.weights, lengths=b.lengths)
    want = jax.grad(lambda p: bj.loss(p, spec, b.xs, b.targets, weights=b.weights, lengths=b.lengths))(params)
    for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


BAD = {
    "no xs": ({"xs": None}, "no array 'xs'"),
    "no targets": ({"targets": None}, "no array 'targets'"),
    "unknown array": ({"lenghts": np.ones(S, np.int32)}, "unknown arrays ['lenghts']"),
    "xs not 3-D": ({"xs": np.zeros((S, T), np.float32)}, "xs must be a float array [S, T, N]"),
    "xs strings": ({"xs": np.full((S, T, N), "a")}, "xs must be a float array [S, T, N]"),
    "xs NaN": ({"xs": np.where(np.arange(N) == 1, np.nan, np.zeros((S, T, N), np.float32))}, "xs holds NaN or inf"),
    "targets shape": (
        {"targets": np.zeros((S, T + 1), np.int32)},
        f"integer (class) targets must be [S, T] = ({S}, {T})",
    ),
    "targets negative": ({"targets": np.full((S, T), -1, np.int32)}, "targets must be classes >= 0"),
    "targets >= num_classes": ({"num_classes": np.int64(2)}, "targets must be classes in [0, num_classes=2)"),
    "float targets 2-D": ({"targets": np.zeros((S, T), np.float32)}, "class targets must be an integer array"),
    "float targets NaN": ({"targets": np.full((S, T, 1), np.nan, np.float32)}, "targets hold NaN or inf"),
    "lengths > T": ({"lengths": np.full(S, T + 1, np.int32)}, f"lengths must lie in [1, T={T}], got {T + 1}"),
    "lengths 0": ({"lengths": np.zeros(S, np.int32)}, "lengths must lie in [1, T="),
    "lengths float": ({"lengths": np.ones(S, np.float32)}, "lengths must be integer [S]"),
    "weights shape": ({"weights": np.ones((S,), np.float32)}, f"weights must be float [S, T] = ({S}, {T})"),
    "weights negative": ({"weights": -np.ones((S, T), np.float32)}, "weights must be finite and >= 0"),
    "no weight": ({"weights": np.zeros((S, T), np.float32)}, "no step carries weight"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arrays_are_named(case, tmp_path):
    change, message = BAD[case]
    arrays = {k: v for k, v in (_arrays() | change).items() if v is not None}
    with pytest.raises(data.ArraysError, match=None) as e:
        data.load_arrays(_save(tmp_path, **arrays))
    assert message in str(e.value)


def test_unreadable_files_are_named(tmp_path):
    ragged = np.empty(2, object)
    ragged[:] = [np.zeros((3, N)), np.zeros((5, N))]
    np.savez(tmp_path / "ragged.npz", xs=ragged, targets=np.zeros((2, 5), np.int32))
    (tmp_path / "text.npz").write_text("not numpy")
    np.save(tmp_path / "one.npy", np.zeros((S, T, N)))
    cases = {
        tmp_path / "ragged.npz": "ragged sequences must be padded to one length T",
        tmp_path / "text.npz": "not a NumPy .npz file",
        tmp_path / "one.npy": "holds one bare array",
        tmp_path / "missing.npz": "no such file",
    }
    for path, message in cases.items():
        with pytest.raises(data.ArraysError) as e:
            data.load_arrays(path)
        assert message in str(e.value) and str(path) in str(e.value)
    with pytest.raises(data.ArraysError, match="leaves 0 for validation"):
        data.split_arrays(data.check_arrays(_arrays()), 0.01)


def test_bad_file_through_the_command_writes_nothing(tmp_path, capsys):
    bad = _save(tmp_path, **_arrays(lengths=np.full(S, T + 1, np.int32)))
    _, cfg = _config(tmp_path, bad)
    for extra in ([], ["--processes", "2"]):
        assert cli.main(["run", str(cfg), "--out", str(tmp_path / "run"), *extra]) == 1
        err = capsys.readouterr().err
        assert f"lengths must lie in [1, T={T}]" in err and "Traceback" not in err
        assert not (tmp_path / "run").exists()
    with pytest.raises(launch.LaunchError, match="lengths must lie in"):
        launch.launch(str(cfg), [], str(tmp_path / "run"), processes=2)


def test_the_example_trains_and_resumes(tmp_path):
    """The example file of experiments/make_arrays.py through `bptt-jax run`; the shipped config's
    task settings; a resumed run equals an uninterrupted one."""
    path = tmp_path / "ex.npz"
    np.savez(path, **_example().make(96, seed=0))
    sets = [
        f"data.path={path.as_posix()}",
        "train.steps=4",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "model.hidden_sizes=[6]",
        "train.log_every=1",
        "output.plots=false",
    ]
    cfg = load_config(ROOT / "configs" / "arrays_example.toml", sets)
    summary = runner.run(cfg, tmp_path / "a", log=lambda s: None, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert summary["task"] == "arrays" and summary["steps"] == 4 and np.isfinite(summary["best_val_loss"])
    assert 0.0 <= rows[-1]["val_accuracy"] <= 1.0
    short = load_config(ROOT / "configs" / "arrays_example.toml", [*sets, "train.steps=2"])
    runner.run(short, tmp_path / "b", log=lambda s: None, progress=False)
    runner.run(cfg, tmp_path / "b", resume=True, log=lambda s: None, progress=False)
    _, _, _, pa, _ = runner.load_run(tmp_path / "a", "last")
    _, _, _, pb, _ = runner.load_run(tmp_path / "b", "last")
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_array_equal(x, y)
    # `bptt-jax gradcheck` on the task's batch (lengths and many-to-one weights): explicit BPTT = jax.grad
    assert cli.gradcheck(cfg)["ok"]
