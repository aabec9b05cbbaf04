"""Data-parallel training over devices (and hosts) with JAX's own SPMD machinery.

A ``jax.sharding.Mesh`` with one axis ``"data"`` over the chosen devices; every batch is split
along B (axis 1 of the time-major arrays), parameters and optimizer state are replicated. The
train step runs per shard under ``jax.shard_map``: each shard runs the unchanged explicit BPTT on
its B / n sequences, then ``lax.pmean`` over ``"data"`` averages loss and gradients (XLA's
all-reduce), so every shard applies the same optax update. The result equals the single-device
step on the same global batch up to float32 summation order.

Multi-host: call ``initialize_distributed`` (done by the runner when ``train.num_processes > 1``
or the environment sets ``BPTT_JAX_COORDINATOR``) before anything touches a device; every host then
runs the same config and feeds its own slice of the global batch
(``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bptt_jax.core.params import RNNSpec
from bptt_jax.training import train

AXIS = "data"
JAX_HEARTBEAT_FACTOR = 3  # JAX's heartbeat timeout over train.peer_timeout_s (initialize_distributed)


def initialize_distributed(
    coordinator_address: str = "", num_processes: int = 1, process_id: int = 0, peer_timeout_s: int = 60
) -> bool:
    """Calls ``jax.distributed.initialize`` from arguments or the environment variables
    BPTT_JAX_COORDINATOR, BPTT_JAX_NUM_PROCESSES, BPTT_JAX_PROCESS_ID. Returns True if it did.

    On CPUs the collectives run over gloo (TCP), so several processes on one machine exercise the
    same code as several hosts. The peer watch (``watch_peers``) names a dead process after
    ``peer_timeout_s / 2``; JAX's own heartbeat, which aborts the survivors with a runtime log and no
    message of ours, gets ``JAX_HEARTBEAT_FACTOR * peer_timeout_s``. It must stay well behind the
    watch: its clients beat only every few seconds, so with the same timeout as ``peer_timeout_s`` = 10
    it aborted the survivor 7.4 s after a SIGKILL (measured), racing a watch that speaks at 5 to 6 s;
    with 3 x 10 s, 19.5 s after it.
    """
    address = coordinator_address or os.environ.get("BPTT_JAX_COORDINATOR", "")
    n = int(os.environ.get("BPTT_JAX_NUM_PROCESSES", num_processes))
    pid = int(os.environ.get("BPTT_JAX_PROCESS_ID", process_id))
    if n <= 1 and not address:
        return False
    if not address:
        raise ValueError("train.coordinator_address: needed (host:port of process 0) when num_processes > 1")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # a runtime choice, before any device use
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=n,
        process_id=pid,
        heartbeat_timeout_seconds=int(JAX_HEARTBEAT_FACTOR * peer_timeout_s),
    )
    return True


EXIT_PEER_LOST = 75  # the exit status of a process that stopped because a peer was lost


class PeerWatch:
    """Notices a lost peer process and stops this one with a message that names it.

    A daemon thread writes a counter of this process into the distributed runtime's key-value
    store (on process 0) every ``interval_s`` and reads every other process's counter. A process
    whose counter has not moved for ``limit_s`` seconds, and that has not said it is done, is lost:
    the thread prints which one to stderr and ends this process with status EXIT_PEER_LOST, even
    while the main thread waits inside a collective that will never complete. When the store
    itself cannot be reached, process 0 (which holds it) is the one lost.

    JAX's own heartbeat (``heartbeat_timeout_seconds``) also ends the survivors, by an abort with
    a runtime log, once a peer has been silent for ``JAX_HEARTBEAT_FACTOR`` x train.peer_timeout_s
    (from its last beat, which can be seconds before its death); the watch uses half of
    train.peer_timeout_s, so its message comes first. Checkpoints are written atomically, so the last one on disk stays loadable.

    When the main thread fails first (a collective whose peer is gone raises), ``explain()`` gives the
    watch the time it needs to name the peer, so the user reads the same one line either way.
    """

    PREFIX = "bptt_jax/alive/"
    DONE = "bptt_jax/done/"
    FAILED = "bptt_jax/failed/"

    def __init__(
        self,
        limit_s: float,
        interval_s: float | None = None,
        *,
        note: str = "",
        exit=os._exit,
        stderr=None,
        client=None,
        me: int | None = None,
        n: int | None = None,
    ):
        if client is None:
            from jax._src import distributed

            client = distributed.global_state.client
        if client is None:
            raise RuntimeError("PeerWatch: jax.distributed is not initialized")
        self._client: Any = client
        self.limit_s = float(limit_s)
        self.interval_s = interval_s if interval_s is not None else max(0.2, min(1.0, self.limit_s / 10))
        self.me = jax.process_index() if me is None else me
        self.n = jax.process_count() if n is None else n
        self.note = note
        self.lost: str | None = None  # the message, once a peer is found lost
        self._exit, self._stderr = exit, stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bptt-jax-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        self._beat(0)
        self._thread.start()
        return self

    def done(self, error: str | None = None) -> None:
        """Says this process has finished (its silence is then no loss), or failed with ``error``
        (the others then stop, naming it), and stops the thread."""
        self._stop.set()
        try:
            if error is None:
                self._client.key_value_set(f"{self.DONE}{self.me}", "", allow_overwrite=True)
            else:
                self._client.key_value_set(f"{self.FAILED}{self.me}", error[:300], allow_overwrite=True)
        except Exception:  # the coordinator may already have gone at the very end
            pass

    def explain(self) -> bool:
        """Waits (at most the limit plus two checks) for the watch to find a lost or failed peer;
        True if it did (with the default ``exit`` the process has then ended). False: every peer is
        alive, the failure is this process's own."""
        if self._thread.is_alive():
            self._thread.join(self.limit_s + 2 * self.interval_s + 1.0)
        return self.lost is not None

    def _beat(self, count: int) -> None:
        self._client.key_value_set(f"{self.PREFIX}{self.me}", str(count), allow_overwrite=True)

    def _lost(self, message: str) -> None:
        self.lost = f"error: {message}; stopping process {self.me} of {self.n}" + (
            f"; {self.note}" if self.note else ""
        )
        print(self.lost, file=self._stderr or sys.stderr, flush=True)
        self._exit(EXIT_PEER_LOST)

    def _loop(self) -> None:
        start = time.monotonic()
        seen: dict[int, tuple[str | None, float]] = {}
        count = 0
        while not self._stop.wait(self.interval_s):
            count += 1
            try:
                self._beat(count)
                alive = dict(self._client.key_value_dir_get(self.PREFIX))
                done = {k for k, _ in self._client.key_value_dir_get(self.DONE)}
                failed = dict(self._client.key_value_dir_get(self.FAILED))
            except Exception as e:
                if self._stop.is_set():
                    return
                self._lost(f"lost contact with process 0 (the coordinator): {str(e).splitlines()[0][:200]}")
                return
            now = time.monotonic()
            for p in range(self.n):
                if p == self.me or f"{self.DONE}{p}" in done:
                    continue
                if f"{self.FAILED}{p}" in failed:
                    self._lost(f"process {p} of {self.n} failed: {failed[f'{self.FAILED}{p}']}")
                    return
                value = alive.get(f"{self.PREFIX}{p}")
                last = seen.get(p)
                if last is None or last[0] != value:
                    seen[p] = (value, now if value is not None else start)
                elif now - last[1] > self.limit_s:
                    self._lost(
                        f"process {p} of {self.n} stopped responding (no sign of life for {now - last[1]:.0f} s; "
                        f"limit {self.limit_s:.0f} s = train.peer_timeout_s / 2)"
                    )
                    return


def watch_peers(peer_timeout_s: float, note: str = "") -> PeerWatch | None:
    """A started ``PeerWatch`` with half of ``peer_timeout_s`` as its limit when several processes
    run, else None. ``note`` ends its message (where the last checkpoint is)."""
    if jax.process_count() <= 1:
        return None
    return PeerWatch(peer_timeout_s / 2, note=note).start()


def is_main_process() -> bool:
    """True in process 0, the one that writes files (every process in a one-process run)."""
    return jax.process_index() == 0


def host_value(x) -> np.ndarray:
    """The NumPy value of x, also when x spans several processes' devices.

    Replicated arrays are read from this process's copy; arrays sharded across processes are
    gathered (``process_allgather``, a collective: every process must make the same call).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_tree(tree):
    """``host_value`` of every leaf (a collective when leaves are sharded across processes)."""
    return jax.tree_util.tree_map(host_value, tree)


def select_devices(devices: str) -> list:
    """ "all" or a count -> that many of ``jax.devices()`` (all hosts' devices when multi-host)."""
    available = jax.devices()
    if devices == "all":
        return available
    n = int(devices)
    if n > len(available):
        raise ValueError(
            f"train.devices: asked for {n} devices, {len(available)} available ({available[0].platform}); "
            "on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N host devices"
        )
    return available[:n]


def make_mesh(devices: str, batch_size: int) -> Mesh:
    devs = select_devices(devices)
    if batch_size % len(devs):
        raise ValueError(
            f"data.batch_size: {batch_size} is not divisible by the {len(devs)} devices of train.devices; "
            f"use a multiple of {len(devs)}"
        )
    return Mesh(np.array(devs), (AXIS,))


def batch_sharding(mesh: Mesh, lengths: bool = False):
    """Shardings of a train.Batch: B is axis 1 of xs/targets/weights and axis 0 of reset and of
    lengths (None when the batches have no lengths)."""

    tree: Any = train.Batch  # the NamedTuple as a tree of shardings, not of arrays
    return tree(
        NamedSharding(mesh, P(None, AXIS)),
        NamedSharding(mesh, P(None, AXIS)),
        NamedSharding(mesh, P(None, AXIS)),
        NamedSharding(mesh, P(AXIS)),
        NamedSharding(mesh, P(AXIS)) if lengths else None,
    )


def shard_batch(mesh: Mesh, batch):
    """Places a global NumPy batch on the mesh. With several hosts each host passes the full global
    batch and keeps only its own slice of B (the batches are a pure function of (seed, step))."""
    shardings = batch_sharding(mesh, lengths=batch.lengths is not None)
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda a, s: jax.device_put(a, s), batch, shardings)
    n, pid = jax.process_count(), jax.process_index()

    def local(a, s, axis):
        a.shape[axis]
        part = np.split(a, n, axis=axis)[pid]
        return jax.make_array_from_process_local_data(s, part, a.shape)

    xs, tg, w, reset, lengths = batch
    return type(batch)(
        local(xs, shardings.xs, 1),
        local(tg, shardings.targets, 1),
        local(w, shardings.weights, 1),
        local(reset, shardings.reset, 0),
        None if lengths is None else local(lengths, shardings.lengths, 0),
    )


def make_sharded_eval(eval_step, mesh: Mesh):
    """``eval_step(params, h, batch)`` on batches split along B over the mesh: each device (and so
    each process) evaluates its own slice; the sums are reduced across them by XLA."""
    carry = NamedSharding(mesh, P(AXIS))

    def run(params, h, batch):
        h = tuple(x if getattr(x, "sharding", None) == carry else jax.device_put(host_value(x), carry) for x in h)
        return eval_step(params, h, shard_batch(mesh, batch))

    return run


def make_sharded_train_step(spec: RNNSpec, optimizer, devices: str, batch_size: int, **kwargs):
    """Like ``train.make_train_step`` but data-parallel over ``devices``; takes NumPy batches.

    The returned step expects a state whose ``carry`` entries are sharded along B (``shard_state``
    does it; the first call does it on the fly) and returns the same layout.
    """
    mesh = make_mesh(devices, batch_size)
    inner = train.make_train_step(spec, optimizer, axis_name=AXIS, jit=False, **kwargs)
    # The NamedTuples as trees of partition specs, not of arrays:
    state_tree: Any = train.TrainState
    metrics_tree: Any = train.StepMetrics
    batch_tree: Any = type(batch_sharding(mesh))
    state_spec = state_tree(P(), P(), P(), tuple(P(AXIS) for _ in spec.state_sizes()), P(), P())
    metrics_spec = metrics_tree(P(), P(), P(), P())
    compiled: dict[bool, Any] = {}  # batches with and without lengths (a task has one kind: one compile)

    def sharded(state, batch):
        has_lengths = batch.lengths is not None
        if has_lengths not in compiled:
            batch_spec = batch_tree(
                P(None, AXIS), P(None, AXIS), P(None, AXIS), P(AXIS), P(AXIS) if has_lengths else None
            )
            compiled[has_lengths] = jax.jit(
                jax.shard_map(
                    inner,
                    mesh=mesh,
                    in_specs=(state_spec, batch_spec),
                    out_specs=(state_spec, metrics_spec),
                    check_vma=False,
                )
            )
        return compiled[has_lengths](state, batch)

    state_shardings = jax.tree_util.tree_map(
        lambda spec_: NamedSharding(mesh, spec_), state_spec, is_leaf=lambda x: isinstance(x, P)
    )

    def step(state, batch):
        # Replicate params/optimizer state and shard the carry (a no-op once they are in place).
        state = jax.tree_util.tree_map(
            lambda sh, sub: jax.tree_util.tree_map(lambda a: jax.device_put(a, sh), sub),
            state_shardings,
            state,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
        return sharded(state, shard_batch(mesh, batch))

    step.mesh = mesh  # type: ignore[attr-defined]  # read by the runner (shard_state)
    return step
