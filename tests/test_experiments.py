"""Smoke tests of the study scripts at tiny size (their real runs take minutes to hours)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cells_study_runs_and_tabulates(tmp_path):
    tiny = ["model.hidden_sizes=[8]", "data.seq_len=8", "data.batch_size=2", "train.eval_every=1", "train.log_every=1"]
    tiny += ["output.plots=false", "output.sample_length=3"]
    cmd = [sys.executable, str(ROOT / "experiments/cells.py"), "--steps", "1", "--seeds", "0", "--out", str(tmp_path)]
    r = subprocess.run(cmd + sum((["--set", s] for s in tiny), []), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert sorted(record) == ["elman", "gru", "lstm"]
    assert all(runs[0]["steps"] == 1 and runs[0]["best_val_bits"] > 0 for runs in record.values())
    assert "| elman | 8 |" in (tmp_path / "results.md").read_text() and (tmp_path / "cells.png").stat().st_size > 0


def test_cells_equal_width_matches_the_parameter_count():
    cells = _module("cells")
    target = cells.parameter_count(cells.CONFIGS["elman"])
    for cell in ("gru", "lstm"):
        n = cells.equal_width(cells.CONFIGS[cell], target)
        got = cells.parameter_count(cells.CONFIGS[cell], [f"model.hidden_sizes=[{n}, {n}]"])
        worse = cells.parameter_count(cells.CONFIGS[cell], [f"model.hidden_sizes=[{n + 4}, {n + 4}]"])
        assert abs(got - target) <= abs(worse - target) and abs(got - target) / target < 0.05


def test_adding_study_runs_every_model_and_tabulates(tmp_path):
    tiny = ["model.hidden_sizes=[4]", "data.batch_size=2", "data.test_size=4", "train.eval_every=1"]
    tiny += ["train.log_every=1"]
    cmd = [sys.executable, str(ROOT / "experiments/adding.py"), "--models", "irnn,lstm0,lstm1,gru", "--lengths", "6"]
    cmd += ["--seeds", "0", "--steps", "2", "--out", str(tmp_path)] + sum((["--set", s] for s in tiny), [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert sorted(record) == ["gru_T6", "irnn_T6", "lstm0_T6", "lstm1_T6"]
    assert all(runs[0]["steps"] == 2 and runs[0]["best_test_mse"] > 0 for runs in record.values())
    table = (tmp_path / "results.md").read_text()
    assert "| LSTM, forget bias 1 | 6 | 1 |" in table and (tmp_path / "adding.png").stat().st_size > 0
    # the two LSTM runs differ in their forget-gate bias only
    cfgs = {m: (tmp_path / f"{m}_T6_seed0" / "config.toml").read_text() for m in ("lstm0", "lstm1")}
    assert "forget_bias = 0.0" in cfgs["lstm0"] and "forget_bias = 1.0" in cfgs["lstm1"]


def test_adding_configs_for_a_length():
    adding = _module("adding")
    path, sets = adding.config_for("irnn", 300)  # a length with its own config
    assert path.endswith("configs/adding_irnn_300.toml") and sets == ()
    path, sets = adding.config_for("lstm1", 200)  # without: the T = 400 config, T set
    assert path.endswith("configs/adding_lstm_400.toml")
    assert sets == ("model.forget_bias=1.0", "data.adding_length=200")


def test_gradflow_lstm_part_on_a_tiny_run(tmp_path):
    """The LSTM part of experiments/gradflow.py: h(t) and c(t) lines before and after training."""
    from bptt_jax.command import runner
    from bptt_jax.command.config import load_config

    gradflow_study = _module("gradflow")
    tiny = ("model.hidden_sizes=[6]", "data.test_size=4")
    sets = ["data.adding_length=10", "data.batch_size=4", "train.steps=3", "model.forget_bias=1.0", *tiny]
    sets += ["output.plots=false", "train.eval_every=1", "train.log_every=1"]
    run_dir = tmp_path / "lstm_run"
    runner.run(load_config(ROOT / "configs/adding_lstm_400.toml", sets), run_dir, progress=False, log=lambda s: None)
    table = gradflow_study.lstm_part(run_dir, [0, 1], tmp_path, t_len=10, extra=tiny)
    rows = [r for r in table.splitlines() if r.startswith("| untrained") or r.startswith("| trained")]
    assert len(rows) == 3 and "forget bias 1)" in rows[2]  # the trained run's bias read from its config
    rates = [float(r.split("|")[3].split()[0]) for r in rows]  # the c(t) lines' rates
    assert all(0 < x < 2 for x in rates) and rates[0] < rates[1]  # bias 1 keeps more of dc than bias 0
    assert (tmp_path / "lstm.png").stat().st_size > 0 and (tmp_path / "lstm.md").read_text() == table


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("adding", ["--models", "irnn", "--steps", "1", "--lengths", "6,0"], "irnn_T0_seed0: "),
        (
            "adding",
            ["--models", "irnn", "--lengths", "6", "--set", "train.step=2"],
            "unknown key 'step' (did you mean 'steps'?)",
        ),
        ("adding", ["--lengths", "6,x"], "--lengths and --seeds take comma-separated integers"),
        ("cells", ["--steps", "1", "--set", "train.step=2"], "unknown key 'step' (did you mean 'steps'?)"),
        ("char_lm", ["--budget", "-1"], "time_limit_s"),
        ("infill", ["--budget", "-1"], "time_limit_s"),
    ],
)
def test_studies_check_every_run_before_the_first(script, args, message, tmp_path, monkeypatch, capsys):
    # A length of 0 in the last entry, a typo'd key, a negative budget: refused (exit 2, a one-line
    # message, no traceback) before any run starts, and nothing written.
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        _module(script).main()
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
