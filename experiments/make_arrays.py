"""Writes a small example file for ``data.task = "arrays"``: your own sequences, as a ``.npz``.

    python experiments/make_arrays.py [--out runs/arrays_example.npz] [--sequences 2000] [--seed 0]

The task: each sequence is a noisy sine wave of 12 to 48 steps (padded to T = 48, its length in
``lengths``) at one of three frequencies; the class of the frequency is the target at the last
valid step only (``weights`` 1 there, 0 elsewhere: many-to-one). Inputs are [S, T, 2]: the wave and
a constant 1 channel. Nothing is downloaded; the file is a pure function of --seed.
Train on it with ``bptt-jax run configs/arrays_example.toml --out runs/arrays_example``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

T_MAX = 48
PERIODS = (7.0, 9.0, 11.0)  # steps per cycle of the three classes


def make(sequences: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, len(PERIODS), size=sequences)
    lengths = rng.integers(12, T_MAX + 1, size=sequences).astype(np.int32)
    phase = rng.uniform(0, 2 * np.pi, size=sequences)
    t = np.arange(T_MAX)[None, :]
    wave = np.sin(2 * np.pi * t / np.array(PERIODS)[classes][:, None] + phase[:, None])
    wave += 1.0 * rng.standard_normal(wave.shape)
    valid = t < lengths[:, None]
    xs = np.stack([np.where(valid, wave, 0.0), valid.astype(float)], axis=-1).astype(np.float32)  # [S, T, 2]
    targets = np.full((sequences, T_MAX), -100, np.int32)  # padding: never read (weight 0)
    weights = np.zeros((sequences, T_MAX), np.float32)
    last = lengths - 1
    targets[np.arange(sequences), last] = classes
    weights[np.arange(sequences), last] = 1.0
    return {"xs": xs, "targets": targets, "lengths": lengths, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/arrays_example.npz")
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = make(args.sequences, args.seed)
    np.savez(out, **arrays)
    shapes = ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items())
    print(f"wrote {out}: {shapes}")


if __name__ == "__main__":
    main()
