"""The on-disk cache of tuned plans: which plan ``bptt_jax.tune`` measured fastest, per problem.

One JSON file, ``plans.json``, in ``cache_dir()``: ``$BPTT_JAX_CACHE_DIR`` when set, else
``$XDG_CACHE_HOME/bptt_jax``, else ``~/.cache/bptt_jax``. ``BPTT_JAX_PLAN_CACHE=off`` stops every
read and write (the rules of ``plan.resolve`` then decide alone). The file maps a key (``key``: the
jax and jaxlib versions, the backend and device kind -- on the CPU backend also the processor
(``host``: its model, family, vector extensions and the cores this process may use, since JAX
calls every CPU "cpu") --, the network, T, B, the dtype and the options that change the work but
not the plan) to an entry: the plan's choices (``block_size``, ``gates``,
``unroll``, ``recurrence``) and what was measured.

Safe by construction: a plan never changes the gradient's value (every plan gives the same
gradients to rounding), so the worst a wrong entry can do is cost time. A corrupt file or an entry
that does not parse is ignored with a warning; a key from another jax version or device simply
does not match. Writes are atomic (a temporary file in the same directory, then ``os.replace``)
and serialised by an exclusive lock on ``plans.lock``, each writer merging its entry into what is
on disk, so concurrent tuners lose nothing; a directory that cannot be written gives a warning and
nothing is cached. Safe to delete at any time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

from bptt_jax.core import cells, forward
from bptt_jax.core.host import cache_dir, host
from bptt_jax.core.host import describe_host as describe_host  # re-exported: the benchmarks print it
from bptt_jax.core.params import RNNSpec

FILE = "plans.json"
FORMAT = 1  # bumped when an entry's meaning changes: entries of another format never match
CHOICES = ("block_size", "gates", "unroll", "recurrence")


class PlanCacheWarning(UserWarning):
    """The plan cache could not be read or written; the call goes on without it."""


def enabled() -> bool:
    """False when ``BPTT_JAX_PLAN_CACHE`` is "off" (or "0", "false")."""
    return os.environ.get("BPTT_JAX_PLAN_CACHE", "on").strip().lower() not in ("off", "0", "false", "no")


def key(spec: RNNSpec, t_len: int, batch: int, dtype, work: dict, backend: str | None = None) -> str:
    """The cache key of one problem: a canonical JSON string.

    Args:
      spec: the network (every field: sizes, cell, directions, merge, activations, compute dtype).
      t_len, batch: T and B.
      dtype: the dtype the recurrence computes in.
      work: the caller's options that change the work but are not the plan's to choose (for
        ``bptt``: generic, diagnostics, with_dxs, checkpoint_every, an output mask, the budget).
      backend: "cpu", "gpu", ...; None: JAX's default backend. On "cpu" the key holds ``host()``
        too: a cache shared by machines with other processors (a home directory on a cluster)
        never hands one machine's plan to another.
    """
    backend = backend or jax.default_backend()
    device = jax.devices(backend)[0]
    fields = {
        "format": FORMAT,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": backend,
        "device_kind": device.device_kind,
        "spec": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()},
        "T": int(t_len),
        "B": int(batch),
        "dtype": str(jax.numpy.dtype(dtype)),
        "work": work,
    }
    if backend == "cpu":
        fields["host"] = host()
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


def _read(path: Path) -> dict:
    """The file's entries ({} when absent); a corrupt file warns and reads as {}."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"plan cache {path}: cannot be read ({e}); tuned plans are not used", PlanCacheWarning, 3)
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("expected an object with 'entries'")
    except ValueError as e:
        warnings.warn(
            f"plan cache {path}: corrupt ({e}); ignored (delete it, or tune again to rewrite it)", PlanCacheWarning, 3
        )
        return {}
    return data["entries"]


def valid_entry(entry, spec: RNNSpec, t_len: int) -> bool:
    """Whether ``entry``'s choices can be used for this network and T (a stale or edited entry
    that cannot is ignored, never used)."""
    if not isinstance(entry, dict) or not all(c in entry for c in CHOICES):
        return False
    block, gates, unroll, rec = (entry[c] for c in CHOICES)
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= t_len:
        return False
    if gates not in ("store", "recompute") or (gates == "store" and cells.get(spec.cell).CACHE == 0):
        return False
    if rec not in ("scan", "pallas", "native"):
        return False
    try:
        forward.resolve_unroll(unroll)
    except (TypeError, ValueError):
        return False
    k = entry.get("checkpoint_every")  # budgeted entries only: None, k steps per segment or nested levels
    levels = k if isinstance(k, list) and k else [k]
    ints = all(not isinstance(v, bool) and isinstance(v, int) and 1 <= v <= t_len for v in levels)
    return k is None or (ints and all(a > b and a % b == 0 for a, b in zip(levels, levels[1:])))


def lookup(cache_key: str, spec: RNNSpec, t_len: int) -> dict | None:
    """The tuned entry for ``cache_key``, or None (no cache, no entry, or an entry that does not
    parse: the last with a warning)."""
    if not enabled():
        return None
    path = cache_dir() / FILE
    entry = _read(path).get(cache_key)
    if entry is None:
        return None
    if not valid_entry(entry, spec, t_len):
        warnings.warn(f"plan cache {path}: an entry that does not parse is ignored: {entry!r}", PlanCacheWarning, 3)
        return None
    return entry


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive lock on ``directory/plans.lock`` (none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: writes stay atomic, merges may race
        yield
        return
    with open(directory / "plans.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record(cache_key: str, entry: dict) -> bool:
    """Merge ``{cache_key: entry}`` into the file, atomically and under the lock. Returns whether
    it was written; a directory that cannot be written warns and returns False."""
    if not enabled():
        return False
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            entries = _read(directory / FILE)
            entries[cache_key] = entry
            fd, tmp = tempfile.mkstemp(prefix=".plans-", suffix=".json", dir=directory)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, directory / FILE)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        warnings.warn(
            f"plan cache {directory}: cannot be written ({e}); the tuned plan is returned but not cached "
            "(set BPTT_JAX_CACHE_DIR to a writable directory)",
            PlanCacheWarning,
            2,
        )
        return False
    return True
