"""``bptt-jax run CONFIG --processes N``: N local processes as one data-parallel job.

For trying multi-process training on one machine. Each process is ``python -m bptt_jax.command.cli run``
with the same config, told its place through the environment (BPTT_JAX_COORDINATOR on 127.0.0.1,
BPTT_JAX_NUM_PROCESSES, BPTT_JAX_PROCESS_ID), so it runs exactly the code that one process per
host runs. The CPU collectives go over gloo on the loopback interface. Process 0's output is shown;
process i > 0 writes to OUT/logs/process-i.log (written by this launcher: the processes themselves
leave the run directory to process 0).

Each process has the CPU devices ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` gives it
(1 without), so the global device count is N * K; the global batch must be divisible by it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

EXIT_SIGNAL = 128 + signal.SIGTERM  # = runner.EXIT_SIGNAL: the job saved its state and stopped on SIGTERM


class LaunchError(ValueError):
    """The processes cannot be started (the message says why)."""


def local_device_count(env: dict) -> int:
    """CPU devices per process: the count in XLA_FLAGS' --xla_force_host_platform_device_count, else 1."""
    found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", env.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """LaunchError when ``port`` on 127.0.0.1 cannot be bound (in use, or out of range)."""
    if not 0 < port < 65536:
        raise LaunchError(f"--port: {port} is not a TCP port (1..65535)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise LaunchError(f"--port: 127.0.0.1:{port} is already in use ({e.strerror}); choose another") from None


def plan(cfg, processes: int, env: dict) -> tuple[int, str]:
    """Checks a job of ``processes`` local processes; returns (global device count, train.devices).

    The named errors: fewer than one process, a batch the global device count does not divide,
    train.devices asking for another count. train.devices = "1" becomes "all" (every process's
    devices), the only mesh a multi-process job can have here.
    """
    if processes < 1:
        raise LaunchError(f"--processes: expected a count >= 1, got {processes}")
    per = local_device_count(env)
    total = processes * per
    devices = cfg.train.devices
    if devices == "1":
        devices = "all"
    if devices != "all" and int(devices) != total:
        raise LaunchError(
            f'train.devices = {cfg.train.devices!r}, but {processes} processes x {per} devices make {total}; use "all"'
        )
    if cfg.data.batch_size % total:
        raise LaunchError(
            f"data.batch_size: {cfg.data.batch_size} is not divisible by the {total} devices of {processes} "
            f"processes x {per} devices (XLA_FLAGS=--xla_force_host_platform_device_count={per}); "
            f"use a multiple of {total}"
        )
    return total, devices


def launch(
    config: str,
    overrides: list[str],
    out: str,
    processes: int,
    *,
    resume: bool = False,
    port: int | None = None,
    env: dict | None = None,
    grace_s: float | None = None,
) -> int:
    """Starts the processes, shows process 0's output, waits for all; returns the job's exit code.

    0 when every process exited 0; otherwise the first failure's code (a signal counts as 128 +
    its number), after naming every process that failed and where its log is. When one process
    fails, the others get ``grace_s`` (default train.peer_timeout_s + 30) to notice and stop
    before they are killed. SIGTERM to the launcher is forwarded to every process; they agree on
    a step, save it and exit with EXIT_SIGNAL (143), which is then the launcher's status; a
    process still running ``grace_s`` after the SIGTERM is killed.
    """
    from bptt_jax.command.config import load_config

    base_env = dict(os.environ if env is None else env)
    cfg = load_config(config, overrides)
    _, devices = plan(cfg, processes, base_env)
    from bptt_jax.command.data import ArraysError, load_arrays
    from bptt_jax.command.runner import RunError, check_destination

    try:
        run_dir = check_destination(out)
        if cfg.data.task == "arrays":  # a bad file is named before anything is written or started
            load_arrays(cfg.data.path)
    except (RunError, ArraysError) as e:
        raise LaunchError(str(e)) from None
    if not resume and ((run_dir / "last.ckpt").exists() or (run_dir / "metrics.jsonl").exists()):
        raise LaunchError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if port is None:
        port = free_port()
    else:
        check_port(port)
    grace = float(cfg.train.peer_timeout_s) + 30.0 if grace_s is None else grace_s
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base_env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, "-m", "bptt_jax.command.cli", "run", config, "--out", out]
    for o in [*overrides, f"train.devices={devices}"]:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    procs: list[subprocess.Popen] = []
    files = []
    stopping: list[float] = []  # set by SIGTERM: every process is asked to save and stop

    def forward_sigterm(signum, frame):
        if not stopping:
            stopping.append(time.monotonic())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, forward_sigterm) if main_thread else None
    try:
        for i in range(processes):
            penv = dict(base_env)
            penv.update(
                BPTT_JAX_COORDINATOR=f"127.0.0.1:{port}",
                BPTT_JAX_NUM_PROCESSES=str(processes),
                BPTT_JAX_PROCESS_ID=str(i),
            )
            if i == 0:
                procs.append(subprocess.Popen(cmd, env=penv))
            else:
                f = open(logs / f"process-{i}.log", "w", encoding="utf-8")
                files.append(f)
                procs.append(subprocess.Popen(cmd, env=penv, stdout=f, stderr=subprocess.STDOUT))
        codes = _wait(procs, grace, stopping)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_handler)
        for f in files:
            f.close()
    if stopping and all(c == EXIT_SIGNAL for c in codes):
        return EXIT_SIGNAL  # every process saved and stopped; process 0 said where and how to resume
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    for i, c in failed:
        how = f"was killed by signal {-c}" if c is not None and c < 0 else f"exited with code {c}"
        where = "output above" if i == 0 else str(logs / f"process-{i}.log")
        print(f"error: process {i} of {processes} {how} ({where})", file=sys.stderr)
    if not failed:
        return 0
    c = failed[0][1]
    return 128 - c if c is not None and c < 0 else (c or 1)


def _wait(procs: list[subprocess.Popen], grace: float, stopping: list[float]) -> list[int | None]:
    """Waits for every process; once one has failed, or SIGTERM has been forwarded to them (the time
    is in ``stopping``), the rest get ``grace`` seconds, then SIGKILL."""
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if deadline is None and stopping:
            deadline = stopping[0] + grace
        if deadline is None and any(c not in (None, 0) for c in codes):
            deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return [p.wait() for p in procs]
        time.sleep(0.2)
