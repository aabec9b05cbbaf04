"""Checkpoints written atomically (temporary file, fsync, rename) and verified on load.

A checkpoint is one ``.npz`` file holding every leaf of a pytree (the ``TrainState``) as
``leaf_00000 ...``, plus a JSON header with the step, the leaves' shapes and dtypes, a SHA-256 of their
bytes and free-form metadata. Loading needs a template pytree of the same structure; a file that is
truncated, corrupt or of another structure raises ``CheckpointError`` and is never loaded silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import jax
import numpy as np

FORMAT = "bptt-jax-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the model."""


def _digest(leaves) -> str:
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.ascontiguousarray(leaf)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path, tree, *, metadata: dict | None = None) -> None:
    """Writes ``tree`` to ``path`` atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    header = {
        "format": FORMAT,
        "num_leaves": len(leaves),
        "shapes": [list(a.shape) for a in leaves],
        "dtypes": [str(a.dtype) for a in leaves],
        "sha256": _digest(leaves),
        "metadata": metadata or {},
    }
    arrays = {f"leaf_{i:05d}": a for i, a in enumerate(leaves)}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub overload misses **kwargs
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_header(path) -> dict:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z["header"]).decode())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path}: corrupt or truncated ({type(e).__name__}: {e})") from None


def load(path, template):
    """Reads a checkpoint into the structure of ``template``. Returns (tree, metadata)."""
    path = Path(path)
    header = read_header(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {header.get('format')!r}, expected {FORMAT!r}")
    want_leaves, treedef = jax.tree_util.tree_flatten(template)
    if header["num_leaves"] != len(want_leaves):
        raise CheckpointError(
            f"checkpoint {path}: holds {header['num_leaves']} arrays, the model expects {len(want_leaves)} "
            "(was it written for another config?)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            leaves = [np.array(z[f"leaf_{i:05d}"]) for i in range(len(want_leaves))]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path}: corrupt or truncated ({type(e).__name__}: {e})") from None
    if _digest(leaves) != header["sha256"]:
        raise CheckpointError(f"checkpoint {path}: corrupt (SHA-256 of the arrays does not match its header)")
    for i, (got, want) in enumerate(zip(leaves, want_leaves)):
        if tuple(got.shape) != tuple(np.shape(want)):
            raise CheckpointError(
                f"checkpoint {path}: array {i} has shape {got.shape}, the model expects {np.shape(want)} "
                "(was it written for another config?)"
            )
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(a) for a in leaves]), header["metadata"]
