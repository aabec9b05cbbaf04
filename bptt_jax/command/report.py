"""What a run leaves besides its checkpoints: summary.json, the sample from the best checkpoint and
the plots (loss.png, dh_norms.png); and ``RunError``, the error a run stops with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.command import data
from bptt_jax.training import checkpoint


class RunError(RuntimeError):
    """The run cannot start or had to stop (message says why)."""


def finish(cfg, out: Path, task, spec, state, best_val, seconds, last_dh, stop_reason, log) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    summary = {
        "task": task.name,
        "steps": int(state.step),
        "seconds": round(seconds, 2),
        "stopped_by": stop_reason,
        "skipped_updates": int(state.nonfinite_total),
        "best_val_loss": best_val,
        "final_val_loss": next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None),
        "baseline": task.baseline,
        "grad": cfg.train.grad,
        "spec": {
            "input_size": spec.input_size,
            "hidden_sizes": list(spec.hidden_sizes),
            "output_size": spec.output_size,
            "bidirectional": spec.bidirectional,
            "cell": spec.cell,
        },
    }
    if task.name in ("text", "infill") and math.isfinite(best_val):
        summary["best_val_bits_per_char"] = best_val / math.log(2)
    if task.name == "infill":
        summary["best_val_accuracy"] = max((r.get("val_accuracy", 0.0) for r in rows), default=0.0)
    if last_dh is not None:
        summary["dh_norms_last"] = np.asarray(last_dh).tolist()
    # A run stopped by a signal saves no sample: a preempted job has seconds left, not minutes.
    if task.name == "text" and (out / "best.ckpt").exists() and stop_reason != "signal":
        params, _ = checkpoint.load(out / "best.ckpt", state.params)
        text = sample_text(
            params,
            spec,
            task.vocab,
            prime=None,
            length=cfg.output.sample_length,
            temperature=cfg.output.temperature,
            seed=cfg.train.seed,
        )
        (out / "sample.txt").write_text(text, encoding="utf-8")
        summary["sample"] = text
        log("sample from the best checkpoint:\n" + text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if cfg.output.plots:
        plot(out, rows, last_dh, task, spec.state_labels())
    return summary


def sample_text(params, spec, vocab: data.Vocab, *, prime, length: int, temperature: float, seed: int) -> str:
    """``prime`` followed by ``length`` sampled characters; prime None starts from a newline (or
    the vocabulary's first character when the text has no newline)."""
    from bptt_jax.training import generate

    if not prime:
        prime = "\n" if "\n" in vocab.chars else vocab.chars[0]
    unknown = sorted({c for c in prime if c not in vocab.chars})
    if unknown:
        raise RunError(f"--prime: characters not in the model's vocabulary: {unknown!r}")
    xs = jnp.asarray(data.one_hot(vocab.encode(prime), len(vocab.chars)))[:, None, :]
    ids = generate.sample_ids(jax.random.key(seed), params, spec, xs, length, temperature)
    return prime + vocab.decode(np.asarray(ids))


def plot(out: Path, rows, last_dh, task, labels=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    scale = (1 / math.log(2)) if task.name in ("text", "infill") else 1.0
    unit = "bits per character" if scale != 1.0 else "loss"
    ax.plot(steps, [r["loss"] * scale for r in rows], label="training")
    val = [(r["step"], r["val_loss"] * scale) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    if last_dh is not None and np.all(np.isfinite(last_dh)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for j in range(last_dh.shape[1]):
            label = labels[j] if labels is not None else f"entry {j}"  # "layer 1 forward", ...
            ax.semilogy(np.maximum(last_dh[:, j], 1e-30), label=label)
        ax.set_xlabel("t")
        ax.set_ylabel("mean ||dDIV/dh(t)||")
        ax.set_title("gradient reaching h(t), last logged batch")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "dh_norms.png", dpi=100)
        plt.close(fig)
