"""The user's own sequences (``data.task = "arrays"``): a NumPy ``.npz`` file read, checked by name
and cut into batches. Nothing here trusts the file: every array is checked before anything is written."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bptt_jax.training.train import Batch


class ArraysError(ValueError):
    """A ``data.task = "arrays"`` file is unusable; the message names the array and what was expected."""


ARRAY_NAMES = ("xs", "targets", "lengths", "weights", "num_classes")


class Arrays(NamedTuple):
    """A user's sequences, batch-major as in the file, checked by ``load_arrays``."""

    xs: np.ndarray  # [S, T, N] float32
    targets: np.ndarray  # [S, T] int32 classes or [S, T, M] float32
    lengths: np.ndarray  # [S] int32 in [1, T]
    weights: np.ndarray  # [S, T] float32 >= 0, zero at steps t >= lengths
    num_classes: int | None  # M for class targets; None for float targets


def _array_kind(a: np.ndarray) -> str:
    return "integer" if np.issubdtype(a.dtype, np.integer) else "float" if np.issubdtype(a.dtype, np.floating) else ""


def load_arrays(path) -> Arrays:
    """Reads and checks a ``.npz`` file of sequences (``np.savez(path, xs=..., targets=...)``).

    Arrays, S sequences of T steps (pad shorter ones and give ``lengths``):

    - ``xs`` [S, T, N] inputs, float (integers and booleans are converted), finite;
    - ``targets`` [S, T] integer classes in [0, M) or [S, T, M] float (regression, finite);
    - ``lengths`` [S] integer valid steps in [1, T] (optional; all T): steps t >= lengths hold the state
      and carry no loss, and a bidirectional network's reverse net starts at the last valid step;
    - ``weights`` [S, T] float w(t) >= 0 (optional; ones): many-to-one is a weight 1 on the last valid
      step and 0 elsewhere;
    - ``num_classes`` scalar integer M (optional; the largest class that carries weight, plus one).

    Targets at steps that carry no weight are not read (any value, e.g. -100, may pad them). Raises
    ArraysError naming the array at fault and what was expected.
    """
    where = f"data.path {str(path)!r}"
    if not str(path):
        raise ArraysError('data.path: data.task = "arrays" needs a .npz file (np.savez(path, xs=..., targets=...))')
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ArraysError(f"{where}: no such file") from None
    except (OSError, ValueError) as e:
        raise ArraysError(f"{where}: not a NumPy .npz file ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ArraysError(
            f"{where}: holds one bare array (a .npy); save the arrays by name: np.savez(path, xs=..., targets=...)"
        )
    with loaded:
        arrays = {}
        for name in loaded.files:
            try:
                arrays[name] = np.asarray(loaded[name])
            except ValueError as e:  # object arrays: ragged lists of sequences, saved with pickle
                raise ArraysError(
                    f"{where}: array {name!r} cannot be read without pickle ({e}); ragged sequences must be padded "
                    "to one length T, with their lengths in 'lengths'"
                ) from None
    return check_arrays(arrays, where)


def check_arrays(arrays, where: str = "arrays") -> Arrays:
    """The checks and conversions of ``load_arrays`` on a mapping of NumPy arrays (names as there);
    ``where`` starts every error message."""
    unknown = sorted(set(arrays) - set(ARRAY_NAMES))
    if unknown:
        raise ArraysError(f"{where}: unknown arrays {unknown}; allowed: {list(ARRAY_NAMES)}")
    for name in ("xs", "targets"):
        if name not in arrays:
            raise ArraysError(f"{where}: no array {name!r} (it holds {sorted(arrays)}); needed: xs and targets")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    xs = arrays["xs"]
    if not (_array_kind(xs) or xs.dtype == bool) or xs.ndim != 3 or 0 in xs.shape:
        raise ArraysError(f"{where}: xs must be a float array [S, T, N] with S, T, N >= 1, got {xs.dtype} {xs.shape}")
    s, t_len, _ = xs.shape
    xs = xs.astype(np.float32)
    if not np.all(np.isfinite(xs)):
        bad = np.argwhere(~np.isfinite(xs))[0]
        raise ArraysError(f"{where}: xs holds NaN or inf (first at sequence {bad[0]}, step {bad[1]}, feature {bad[2]})")

    lengths = arrays.get("lengths")
    if lengths is None:
        lengths = np.full((s,), t_len, np.int32)
    elif _array_kind(lengths) != "integer" or lengths.shape != (s,):
        raise ArraysError(f"{where}: lengths must be integer [S] = ({s},), got {lengths.dtype} {lengths.shape}")
    elif lengths.min() < 1 or lengths.max() > t_len:
        i = int(np.argmax((lengths < 1) | (lengths > t_len)))
        raise ArraysError(f"{where}: lengths must lie in [1, T={t_len}], got {int(lengths[i])} for sequence {i}")
    lengths = lengths.astype(np.int32)
    valid = np.arange(t_len)[None, :] < lengths[:, None]  # [S, T]

    weights = arrays.get("weights")
    if weights is None:
        weights = np.ones((s, t_len), np.float32)
    elif not _array_kind(weights) or weights.shape != (s, t_len):
        raise ArraysError(
            f"{where}: weights must be float [S, T] = ({s}, {t_len}), got {weights.dtype} {weights.shape}"
        )
    elif not np.all(np.isfinite(weights)) or weights.min() < 0:
        raise ArraysError(f"{where}: weights must be finite and >= 0")
    weights = np.where(valid, weights, 0.0).astype(np.float32)
    if not np.any(weights > 0):
        raise ArraysError(f"{where}: no step carries weight (weights are 0 on every valid step)")
    counted = weights > 0

    targets = arrays["targets"]
    kind = _array_kind(targets)
    num_classes = None
    if kind == "integer":
        if targets.shape != (s, t_len):
            raise ArraysError(
                f"{where}: integer (class) targets must be [S, T] = ({s}, {t_len}), got {targets.shape}"
                + ("; float targets [S, T, M] are for regression" if targets.ndim == 3 else "")
            )
        used = targets[counted]
        if used.min() < 0:
            i = np.argwhere(counted & (targets < 0))[0]
            raise ArraysError(
                f"{where}: targets must be classes >= 0 where the weight is > 0, got {int(targets[tuple(i)])} at "
                f"sequence {i[0]}, step {i[1]}"
            )
        given = arrays.get("num_classes")
        if given is None:
            num_classes = max(int(used.max()) + 1, 2)
        else:
            if given.shape != () or _array_kind(given) != "integer" or int(given) < 2:
                raise ArraysError(
                    f"{where}: num_classes must be one integer >= 2, got {given.dtype} {given.shape} {given!r}"
                )
            num_classes = int(given)
            if used.max() >= num_classes:
                i = np.argwhere(counted & (targets >= num_classes))[0]
                raise ArraysError(
                    f"{where}: targets must be classes in [0, num_classes={num_classes}), got "
                    f"{int(targets[tuple(i)])} at sequence {i[0]}, step {i[1]}"
                )
        targets = np.where(counted, targets, 0).astype(np.int32)  # uncounted steps: any value, read as 0
    elif kind == "float":
        if targets.ndim != 3 or targets.shape[:2] != (s, t_len) or targets.shape[2] < 1:
            raise ArraysError(
                f"{where}: float targets must be [S, T, M] = ({s}, {t_len}, M) (regression), got {targets.shape}"
                + ("; class targets must be an integer array [S, T]" if targets.ndim == 2 else "")
            )
        if "num_classes" in arrays:
            raise ArraysError(f"{where}: num_classes is for integer (class) targets; these are float")
        if not np.all(np.isfinite(targets[counted])):
            raise ArraysError(f"{where}: targets hold NaN or inf at steps that carry weight")
        targets = np.where(counted[..., None], targets, 0.0).astype(np.float32)
    else:
        raise ArraysError(f"{where}: targets must be integer classes [S, T] or float [S, T, M], got {targets.dtype}")
    return Arrays(xs, targets, lengths, weights, num_classes)


def split_arrays(a: Arrays, validation_fraction: float) -> tuple[Arrays, Arrays]:
    """(train, validation): a fixed random share of the sequences, the same for every seed."""
    s = a.xs.shape[0]
    n_val = int(s * validation_fraction)
    if n_val < 1 or n_val >= s:
        raise ArraysError(
            f"data.validation_fraction: {validation_fraction} of {s} sequences leaves {n_val} for validation and "
            f"{s - n_val} for training; both need at least one"
        )
    order = np.random.default_rng(0).permutation(s)

    def take(idx):
        return Arrays(a.xs[idx], a.targets[idx], a.lengths[idx], a.weights[idx], a.num_classes)

    return take(np.sort(order[n_val:])), take(np.sort(order[:n_val]))


def arrays_batch(a: Arrays, idx: np.ndarray, pad_to: int | None = None) -> Batch:
    """Sequences ``idx`` of ``a`` as a time-major Batch; ``pad_to`` adds weightless sequences."""
    b = len(idx)
    batch = Batch(
        a.xs[idx].transpose(1, 0, 2),
        a.targets[idx].swapaxes(0, 1),
        a.weights[idx].T,
        np.ones((b,), bool),
        a.lengths[idx],
    )
    if pad_to is None or pad_to == b:
        return batch
    extra = pad_to - b
    return Batch(
        np.concatenate([batch.xs, np.zeros((batch.xs.shape[0], extra, batch.xs.shape[2]), np.float32)], 1),
        np.concatenate(
            [batch.targets, np.zeros((batch.targets.shape[0], extra, *batch.targets.shape[2:]), batch.targets.dtype)], 1
        ),
        np.concatenate([batch.weights, np.zeros((batch.weights.shape[0], extra), np.float32)], 1),
        np.ones((pad_to,), bool),
        np.concatenate([batch.lengths, np.ones((extra,), np.int32)]),
    )
