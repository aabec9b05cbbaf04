"""Several processes on one machine (gloo over 127.0.0.1) as one job: equal to one process (dropout on),
resumable across job shapes, saving and stopping together on SIGTERM, stopping with a named error when
a peer is lost; the launcher's refusals."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bptt_jax.command import cli, runner
from bptt_jax.command.config import load_config
from bptt_jax.training import checkpoint
from bptt_jax.training.parallel import EXIT_PEER_LOST

# Timing-sensitive (peer timeouts, several processes per test): run alone, after the parallel part of the
# suite (README test command, .ci/run), never beside other tests.
pytestmark = pytest.mark.serial

ROOT = Path(__file__).resolve().parents[1]
# Without the inherited XLA_FLAGS: no inherited device count. The runs that are only compared when
# done (_run) take the other inherited flags (conftest.py's compile economy); the two timed scenarios (the
# lost peer, SIGTERM to the launcher) keep XLA's default code generation, under which their race
# margins were measured.
BASE_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
BASE_ENV.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
COMPILE_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
TIMEOUT = 300


def _env(devices_per_process: int, *, compile_economy: bool = False) -> dict:
    env = dict(BASE_ENV)
    flags = list(COMPILE_FLAGS) if compile_economy else []
    if devices_per_process > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def _run(config, out, *, processes=1, devices=1, sets=(), resume=False):
    cmd = [sys.executable, "-m", "bptt_jax.command.cli", "run", str(config), "--out", str(out)]
    cmd += sum((["--set", s] for s in sets), [])
    if processes > 1:
        cmd += ["--processes", str(processes)]
    if resume:
        cmd.append("--resume")
    r = subprocess.run(cmd, env=_env(devices, compile_economy=True), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _leaves(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[k] for k in sorted(z.files) if k.startswith("leaf_")]


def _relative_difference(a: Path, b: Path) -> float:
    """Largest |a - b| over every float array of two checkpoints (step, parameters, Adam moments,
    carried states), relative to that array's largest |b|."""
    worst = 0.0
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.shape == y.shape
        if np.issubdtype(x.dtype, np.floating):
            worst = max(worst, float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(y))), 1e-30))
        else:
            np.testing.assert_array_equal(x, y)
    return worst


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_configs")
    text = d / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 60, encoding="utf-8")

    def config(model: str, task: str, stateful: bool) -> str:
        return (
            f"[model]\n{model}\n"
            f"[data]\ntask = '{task}'\ncorpus = 'file'\npath = '{text.as_posix()}'\nseq_len = 8\nbatch_size = 8\n"
            "[optim]\nlearning_rate = 0.01\n"
            "[train]\nsteps = 4\nlog_every = 2\neval_every = 2\ncheckpoint_every = 2\ndevices = 'all'\n"
            "input_dropout = 0.1\noutput_dropout = 0.3\n"  # masks by global sequence index: any layout
            f"stateful = {str(stateful).lower()}\n"
            "[output]\nplots = false\nsample_length = 5\n"
        )

    uni = d / "uni.toml"  # a language model: the hidden state is carried from chunk to chunk
    uni.write_text(config("hidden_sizes = [8, 6]", "text", True))
    bi = d / "bi.toml"  # a bidirectional GRU infilling masked characters
    bi.write_text(config("hidden_sizes = [8]\nbidirectional = true\ncell = 'gru'", "infill", False))
    lstm = d / "lstm.toml"  # an LSTM language model: (h, c) pairs carried, gathered into checkpoints
    lstm.write_text(config("hidden_sizes = [6, 5]\ncell = 'lstm'\nforget_bias = 1.0", "text", True))
    return {"uni": uni, "bi": bi, "lstm": lstm}


@pytest.fixture(scope="module")
def runs(configs, tmp_path_factory):
    """Each network (an Elman language model, a bidirectional GRU, an LSTM language model) trained 4
    Adam steps as 2 processes x 2 devices, 1 x 4 (not the LSTM: the suite's time) and 1 x 1."""
    d = tmp_path_factory.mktemp("mp_runs")
    shapes = {"2x2": (2, 2), "1x4": (1, 4), "1x1": (1, 1)}
    jobs = [(net, name) for net in configs for name in shapes if not (net == "lstm" and name == "1x4")]

    def one(job):
        net, name = job
        p, k = shapes[name]
        return job, (d / f"{net}_{name}", _run(configs[net], d / f"{net}_{name}", processes=p, devices=k))

    # Two runs at a time (the runs are only compared when done, nothing here is timed): the serial
    # part of the suite has both cores to itself, and a run is mostly start-up and compilation.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, jobs))


@pytest.mark.parametrize("net", ["uni", "bi", "lstm"])
def test_two_processes_equal_one_process(runs, net):
    two, r = runs[net, "2x2"]
    for other in [o for o in ("1x4", "1x1") if (net, o) in runs]:
        diff = _relative_difference(two / "last.ckpt", runs[net, other][0] / "last.ckpt")
        print(f"{net}: 2 processes x 2 devices vs {other}: relative difference {diff:.2e}")
        assert diff <= 1e-5, (other, diff)  # float32 summation order only
    # Process 0 alone wrote the run directory: one metrics row per logged step, one summary;
    # process 1's output is in the launcher's log.
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    assert sorted(p.name for p in two.iterdir()) == sorted(
        ["best.ckpt", "config.toml", "last.ckpt", "logs", "metrics.jsonl", "summary.json"]
        + (["sample.txt"] if net != "bi" else [])
    )
    assert [p.name for p in (two / "logs").iterdir()] == ["process-1.log"]
    assert '"steps": 4' in (two / "logs" / "process-1.log").read_text()
    header = checkpoint.read_header(two / "last.ckpt")["metadata"]
    assert header["global_batch_size"] == 8 and header["processes"] == 2
    # evaluation was split across the processes and agrees with one process
    val = [row["val_loss"] for row in rows]
    want = [json.loads(line)["val_loss"] for line in (runs[net, "1x1"][0] / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(val, want, rtol=1e-5)


@pytest.mark.parametrize("first,then", [("2x2", "1x1"), ("1x1", "2x2")])
def test_resume_across_job_shapes(configs, runs, tmp_path, first, then):
    # Two steps in one shape, two more resumed in the other = four uninterrupted steps in the other.
    shape = {"2x2": (2, 2), "1x1": (1, 1)}
    out = tmp_path / "run"
    p, k = shape[first]
    _run(configs["uni"], out, processes=p, devices=k, sets=["train.steps=2"])
    assert checkpoint.read_header(out / "last.ckpt")["metadata"]["processes"] == p
    p, k = shape[then]
    _run(configs["uni"], out, processes=p, devices=k, resume=True)
    diff = _relative_difference(out / "last.ckpt", runs["uni", then][0] / "last.ckpt")
    print(f"2 steps as {first}, resumed as {then}, vs 4 steps as {then}: relative difference {diff:.2e}")
    assert diff <= 1e-5


def _worker(launcher_pid: int, process_id: int) -> int | None:
    """The pid of the launcher's child that runs process ``process_id`` (read from /proc)."""
    path = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    for pid in path.read_text().split() if path.exists() else []:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"BPTT_JAX_PROCESS_ID={process_id}".encode() in environ:
            return int(pid)
    return None


def test_lost_peer_stops_the_others_with_a_named_error(configs, tmp_path):
    out = tmp_path / "run"
    sets = ["train.steps=1000000", "train.checkpoint_every=20", "train.eval_every=1000000", "train.peer_timeout_s=10"]
    cmd = [
        sys.executable,
        "-m",
        "bptt_jax.command.cli",
        "run",
        str(configs["uni"]),
        "--out",
        str(out),
        "--processes",
        "2",
    ]
    cmd += sum((["--set", s] for s in sets), [])
    launcher = subprocess.Popen(cmd, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "last.ckpt").exists():
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        victim = _worker(launcher.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = launcher.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    print(f"lost peer: the launcher returned {took:.1f} s after the SIGKILL")
    assert launcher.returncode != 0
    assert "Traceback" not in stderr  # however process 0 noticed the loss, it says the same line:
    lines = [line for line in stderr.splitlines() if line.startswith("error: process 1 of 2 stopped responding")]
    assert len(lines) == 1 and lines[0].endswith(
        f"stopping process 0 of 2; the last checkpoint is {out / 'last.ckpt'}"
    ), stderr[-4000:]
    # Not JAX's heartbeat abort (signal 6, a runtime log, no line of ours): with the same timeout as
    # the watch's it won the race now and then under load; it now waits 3 x train.peer_timeout_s.
    assert "Terminating process because the JAX distributed service" not in stderr, stderr[-4000:]
    assert "error: process 1 of 2 was killed by signal 9" in stderr  # the launcher's
    assert f"error: process 0 of 2 exited with code {EXIT_PEER_LOST}" in stderr
    assert took < 10 + 30  # train.peer_timeout_s plus a margin for a loaded machine
    # the last checkpoint on disk is whole and loads
    cfg = load_config(configs["uni"], sets)
    _, spec, optimizer = runner.build(cfg)
    state, meta = checkpoint.load(out / "last.ckpt", runner.initial_state(cfg, spec, optimizer))
    assert int(state.step) == meta["step"] and meta["step"] % 20 == 0


def test_sigterm_to_the_launcher_saves_one_agreed_step(configs, tmp_path):
    # SIGTERM to the launcher reaches both processes; they agree on a step (JAX's preemption sync
    # point), process 0 saves it, both exit 143. Resumed for 10 more steps as 2 processes, the run
    # equals an uninterrupted 2-process one within float32 tolerance. (Against one process the
    # layouts' float32 rounding would add up over the steps taken, which depend on the machine's speed.)
    out = tmp_path / "run"
    sets = ["train.steps=1000000", "train.log_every=10", "train.checkpoint_every=1000000", "train.eval_every=1000000"]
    cmd = [
        sys.executable,
        "-m",
        "bptt_jax.command.cli",
        "run",
        str(configs["uni"]),
        "--out",
        str(out),
        "--processes",
        "2",
    ]
    cmd += sum((["--set", s] for s in sets), [])
    launcher = subprocess.Popen(cmd, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "no metrics written"
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        stdout, stderr = launcher.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 143, (stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr and "error:" not in stderr
    said = [line for line in stdout.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(said) == 1, stdout[-2000:]
    step = int(said[0].split(" at step ")[1].split(";")[0])
    assert said[0] == f"stopped by SIGTERM: state saved to {out / 'last.ckpt'} at step {step}; continue with --resume"
    assert step >= 20 and checkpoint.read_header(out / "last.ckpt")["metadata"]["step"] == step
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "signal"
    assert '"stopped_by": "signal"' in (out / "logs" / "process-1.log").read_text()  # process 1 stopped too
    print(f"SIGTERM to 2 processes: saved step {step}, launcher returned {took:.1f} s after the signal")

    more = [f"train.steps={step + 10}"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # compared when done: not timed
        done = [
            pool.submit(_run, configs["uni"], out, processes=2, sets=more, resume=True),
            pool.submit(_run, configs["uni"], tmp_path / "whole", processes=2, sets=more),
        ]
        for job in done:
            job.result()
    diff = _relative_difference(out / "last.ckpt", tmp_path / "whole" / "last.ckpt")
    print(f"resumed as 2 processes vs uninterrupted as 2 processes, {step + 10} steps: relative difference {diff:.2e}")
    assert diff <= 1e-5


def test_launcher_refusals_are_named(configs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device per process
    out = str(tmp_path / "run")
    assert cli.main(["run", str(configs["uni"]), "--out", out, "--processes", "0"]) == 1
    assert "--processes: expected a count >= 1, got 0" in capsys.readouterr().err
    code = cli.main(["run", str(configs["uni"]), "--out", out, "--processes", "3"])
    assert code == 1
    assert "data.batch_size: 8 is not divisible by the 3 devices of 3 processes x 1 devices" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli.main(["run", str(configs["uni"]), "--out", out, "--processes", "2", "--port", str(port)]) == 1
        assert f"--port: 127.0.0.1:{port} is already in use" in capsys.readouterr().err
    assert cli.main(["run", str(configs["uni"]), "--out", out, "--port", "1234"]) == 2
    assert "--port needs --processes" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing started, nothing written
