"""Data sets that ship with Python or are generated: nothing is ever downloaded.

- text: the characters of a UTF-8 file, or by default the English documentation inside Python's
  standard library (``pydoc_data.topics``: 465,126 characters, 103 distinct), or the standard
  library's own ``.py`` sources (several MB); split into train and validation streams.
- adding: the adding problem (Hochreiter & Schmidhuber 1997; Le, Jaitly & Hinton 2015).
- infill: text with masked characters, each to be predicted from both sides.
- arrays: the user's own sequences, from a NumPy ``.npz`` file (``arrays.load_arrays`` says what it holds).

Every batch is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bptt_jax.command.arrays import (  # noqa: F401 (re-exported: their documented home before 0.2.0)
    ARRAY_NAMES,
    Arrays,
    ArraysError,
    arrays_batch,
    check_arrays,
    load_arrays,
    split_arrays,
)
from bptt_jax.training.train import Batch  # the batch type lives with the train step; re-exported here


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
