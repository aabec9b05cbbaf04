"""Data parallelism on 4 fake CPU devices, in subprocesses so other tests keep one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FLAGS = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform"))
ENV = dict(os.environ, XLA_FLAGS=f"{_FLAGS} --xla_force_host_platform_device_count=4".strip(), PYTHONPATH=str(ROOT))


def test_sharded_step_equals_single_device_and_batch_is_sharded():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests/helpers/parallel_check.py")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("uni", "bi", "bi_lengths"):
        assert out[f"max_param_diff_{key}"] <= 1e-5 * max(1.0, out[f"max_abs_param_{key}"]), out
        assert out[f"loss_diff_{key}"] < 1e-5, out
    assert out["xs_spec"] in ("P(None, 'data')", "PartitionSpec(None, 'data')")
    assert out["xs_num_devices"] == 4 and out["xs_shard_shapes"] == [[5, 2, 3]]
    assert out["carry_shard_shapes"] == [[2, 6]]
    assert out["indivisible_error"] == (
        "data.batch_size: 6 is not divisible by the 4 devices of train.devices; use a multiple of 4"
    )
    assert out["too_many_error"].startswith("train.devices: asked for 8 devices, 4 available (cpu)")


def test_cli_run_on_four_devices(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("abcabcabd " * 200)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"[data]\ncorpus='file'\npath='{text.as_posix()}'\nseq_len=8\nbatch_size=8\n[model]\nhidden_sizes=[8]\n"
        '[train]\nsteps=4\nlog_every=2\neval_every=2\ndevices="4"\n[output]\nplots=false\nsample_length=5\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "bptt_jax.command.cli", "run", str(cfg), "--out", str(tmp_path / "run")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["best_val_loss"] < 10
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bptt_jax.command.cli",
            "run",
            str(cfg),
            "--out",
            str(tmp_path / "run2"),
            "--set",
            "data.batch_size=6",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1 and "data.batch_size: 6 is not divisible by the 4 devices" in r.stderr
