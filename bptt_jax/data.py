"""Data sets that ship with Python or are generated: nothing is ever downloaded.

- text: the characters of a UTF-8 file, or by default the English documentation inside Python's
  standard library (``pydoc_data.topics``: 465,126 characters, 103 distinct), or the standard
  library's own ``.py`` sources (several MB); split into train and validation streams.
- adding: the adding problem (Hochreiter & Schmidhuber 1997; Le, Jaitly & Hinton 2015).
- infill: text with masked characters, each to be predicted from both sides.
- arrays: the user's own sequences, from a NumPy ``.npz`` file (``load_arrays`` says what it holds).

Every batch is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Batch(NamedTuple):
    """One training or evaluation batch (NumPy arrays; the train step moves them to the device)."""

    xs: np.ndarray  # [T, B, N] float32 inputs
    targets: np.ndarray  # [T, B] int32 classes or [T, B, M] float32
    weights: np.ndarray  # [T, B] float32 w(t)
    reset: np.ndarray  # [B] bool: start from zero state (stream wrapped), for stateful tasks
    lengths: np.ndarray | None = None  # [B] int32 valid steps per sequence; None: all T (built-in tasks)


def pydoc_text() -> str:
    """The English documentation in Python's ``pydoc_data.topics``, topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def stdlib_text(max_chars: int = 8_000_000) -> str:
    """The standard library's ``.py`` files, in sorted path order (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages", "test/", "idlelib/idle_test", "lib2to3/tests")):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)


def load_text(corpus: str = "pydoc", path: str = "") -> str:
    """The characters of the chosen corpus: "pydoc", "stdlib" or "file" (``path``, UTF-8)."""
    if corpus == "pydoc":
        return pydoc_text()
    if corpus == "stdlib":
        return stdlib_text()
    if corpus == "file":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"data.path: no such file {path!r}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"data.path: {path!r} is not UTF-8 text ({e})") from None
        if not text:
            raise ValueError(f"data.path: {path!r} is empty")
        return text
    raise ValueError(f"data.corpus: unknown value {corpus!r}; allowed: ['pydoc', 'stdlib', 'file']")


def unigram_entropy_bits(text: str) -> float:
    """Entropy of the character distribution, bits per character (the no-context baseline)."""
    _, counts = np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


class Vocab(NamedTuple):
    chars: str  # the distinct characters, sorted

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> np.ndarray:
        table = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted({c for c in text if c not in table})
        if unknown:
            raise ValueError(f"text: characters not in the vocabulary: {unknown[:10]!r}")
        return np.fromiter((table[c] for c in text), np.int32, len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def one_hot(ids: np.ndarray, size: int) -> np.ndarray:
    return np.eye(size, dtype=np.float32)[ids]


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


class TextStreams:
    """Truncated-BPTT batching: the stream is cut into B parallel rows read T characters at a time.

    Chunk k of row b covers characters [k T, (k + 1) T] of that row; the state carries from chunk
    k to k + 1 and resets when the stream wraps to chunk 0.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, vocab_size: int):
        per_row = len(ids) // batch_size
        if per_row < seq_len + 1:
            raise ValueError(
                f"data: the stream of {len(ids)} characters is too short for batch_size={batch_size} "
                f"rows of seq_len + 1 = {seq_len + 1} characters"
            )
        self.rows = ids[: per_row * batch_size].reshape(batch_size, per_row)  # [B, S]
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_chunks = (per_row - 1) // seq_len

    def batch(self, step: int) -> Batch:
        k = step % self.num_chunks
        t = self.seq_len
        window = self.rows[:, k * t : (k + 1) * t + 1]  # [B, T + 1]
        xs = one_hot(window[:, :-1].T, self.vocab_size)  # [T, B, V]
        targets = window[:, 1:].T.astype(np.int32)  # [T, B]
        b = self.rows.shape[0]
        return Batch(xs, targets, np.ones((t, b), np.float32), np.full((b,), k == 0))


def adding_batch(rng: np.random.Generator, length: int, batch_size: int) -> Batch:
    """The adding problem: channel 0 uniform in [0, 1), channel 1 marks one position in each half;
    the target, at the last step only, is the sum of the two marked numbers."""
    t, b = length, batch_size
    values = rng.random((t, b), dtype=np.float32)
    first = rng.integers(0, max(t // 2, 1), size=b)
    second = rng.integers(t // 2, t, size=b)
    second = np.where(second == first, (first + 1) % t, second) if t > 1 else second
    marks = np.zeros((t, b), np.float32)
    marks[first, np.arange(b)] = 1.0
    marks[second, np.arange(b)] = 1.0
    xs = np.stack([values, marks], axis=-1)  # [T, B, 2]
    targets = np.zeros((t, b, 1), np.float32)
    targets[-1, :, 0] = (values * marks).sum(axis=0)
    weights = np.zeros((t, b), np.float32)
    weights[-1] = 1.0
    return Batch(xs, targets, weights, np.ones((b,), bool))


def infill_batch(
    rng: np.random.Generator, ids: np.ndarray, seq_len: int, batch_size: int, vocab_size: int, mask_prob: float
) -> Batch:
    """Windows of text in which characters are masked (input symbol ``vocab_size``, the extra
    "blank"); the loss is on the masked characters only, so each is predicted from both sides."""
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
    windows = np.stack([ids[s : s + seq_len] for s in starts], axis=1)  # [T, B]
    mask = rng.random(windows.shape) < mask_prob
    mask[rng.integers(0, seq_len, size=batch_size), np.arange(batch_size)] = True  # at least one
    inputs = np.where(mask, vocab_size, windows)
    xs = one_hot(inputs, vocab_size + 1)  # [T, B, V + 1]
    return Batch(xs, windows.astype(np.int32), mask.astype(np.float32), np.ones((batch_size,), bool))


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


def _arrays_task(d, seed: int) -> Task:
    full = load_arrays(d.path)
    train, val = split_arrays(full, d.validation_fraction)
    n_train, b = train.xs.shape[0], d.batch_size

    def train_batch(step: int) -> Batch:
        return arrays_batch(train, np.sort(_rng(seed, step).choice(n_train, size=b, replace=n_train < b)))

    n_val = val.xs.shape[0]
    evals = [arrays_batch(val, np.arange(i, min(i + b, n_val)), pad_to=b) for i in range(0, n_val, b)]
    classes = full.num_classes is not None
    m = full.num_classes if full.num_classes is not None else int(full.targets.shape[2])
    baseline: dict = {"train_sequences": n_train, "validation_sequences": n_val, "T": int(full.xs.shape[1])}
    if classes:
        baseline["uniform_guess_loss"] = math.log(m)  # nats: every class 1/M
    else:  # the squared error of predicting the training mean at every weighted step
        mean = (train.targets * train.weights[..., None]).sum((0, 1)) / train.weights.sum()
        err = ((val.targets - mean) ** 2).sum(-1)
        baseline["mean_guess_loss"] = float((err * val.weights).sum() / val.weights.sum())
    return Task(
        "arrays",
        int(full.xs.shape[2]),
        m,
        "softmax" if classes else "identity",
        "cross_entropy" if classes else "squared_error",
        False,
        train_batch,
        evals,
        None,
        baseline,
    )


class Task(NamedTuple):
    """What the trainer needs to know of a data set."""

    name: str
    input_size: int
    output_size: int
    output_activation: str
    divergence: str
    stateful: bool
    train_batch: object  # step -> Batch
    eval_batches: list  # fixed evaluation batches, in order (state carried when stateful)
    vocab: Vocab | None
    baseline: dict  # reference figures, e.g. unigram entropy or the always-1 MSE


def make_task(data_cfg, seed: int, stateful: bool = True) -> Task:
    """Builds the task named by ``data_cfg.task`` (a ``config.DataConfig``)."""
    d = data_cfg
    if d.task == "arrays":
        return _arrays_task(d, seed)
    if d.task == "adding":
        fixed = _rng(seed, -1 % (2**31))
        tests = [
            adding_batch(fixed, d.adding_length, min(d.test_size, 1000)) for _ in range(max(1, d.test_size // 1000))
        ]
        return Task(
            "adding",
            2,
            1,
            "identity",
            "squared_error",
            False,
            lambda step: adding_batch(_rng(seed, step), d.adding_length, d.batch_size),
            tests,
            None,
            {"always_one_mse": 1.0 / 6.0},
        )
    text = load_text(d.corpus, d.path)
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    n_val = int(len(ids) * d.validation_fraction)
    if n_val < d.seq_len + 2:
        raise ValueError(
            f"data.validation_fraction: {d.validation_fraction} leaves {n_val} validation characters, "
            f"fewer than seq_len + 2 = {d.seq_len + 2}"
        )
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    v = len(vocab.chars)
    baseline = {
        "unigram_entropy_bits": unigram_entropy_bits(text),
        "train_chars": len(train_ids),
        "validation_chars": len(val_ids),
        "vocab_size": v,
    }
    if d.task == "text":
        train = TextStreams(train_ids, d.batch_size, d.seq_len, v)
        val = TextStreams(val_ids, d.batch_size, d.seq_len, v)
        return Task(
            "text",
            v,
            v,
            "softmax",
            "cross_entropy",
            stateful,
            train.batch,
            [val.batch(k) for k in range(val.num_chunks)],
            vocab,
            baseline,
        )
    fixed = _rng(seed, -2 % (2**31))
    n_eval = max(1, math.ceil(d.test_size / d.batch_size))
    evals = [infill_batch(fixed, val_ids, d.seq_len, d.batch_size, v, d.mask_prob) for _ in range(n_eval)]
    return Task(
        "infill",
        v + 1,
        v,
        "softmax",
        "cross_entropy",
        False,
        lambda step: infill_batch(_rng(seed, step), train_ids, d.seq_len, d.batch_size, v, d.mask_prob),
        evals,
        vocab,
        baseline,
    )
