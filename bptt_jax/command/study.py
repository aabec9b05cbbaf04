"""Small studies: several runs from configs, one markdown table and one plot (used by experiments/)."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from bptt_jax.command import runner
from bptt_jax.command.config import ConfigError, load_config


class Entry(NamedTuple):
    label: str
    config: str  # path of a TOML config
    overrides: tuple[str, ...] = ()


def config_error(entries: Sequence[Entry]) -> str | None:
    """The first entry whose config does not load (a bad --set, a length of 0), as a message; None when
    every one loads. Study scripts call it before the first run, so a bad setting in a late entry fails
    at once instead of after hours of runs."""
    for e in entries:
        try:
            load_config(e.config, e.overrides)
        except ConfigError as err:
            return f"{e.label}: {err}"
    return None


def run_entries(entries: Sequence[Entry], out_dir, *, log=print) -> dict[str, dict]:
    """Runs each entry into out_dir/<label>; returns {label: {"summary": ..., "rows": [...]}}."""
    out = Path(out_dir)
    results = {}
    for e in entries:
        cfg = load_config(e.config, e.overrides)
        run_dir = out / e.label
        if (run_dir / "summary.json").exists():
            log(f"[{e.label}] already done, reading {run_dir}")
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            if run_dir.exists():  # an unfinished earlier attempt: start it again from scratch
                for p in run_dir.iterdir():
                    p.unlink()
            log(f"[{e.label}] {e.config} {' '.join(e.overrides)}")
            t0 = time.perf_counter()
            try:
                summary = runner.run(cfg, run_dir, log=lambda s: None, progress=False)
            except runner.RunError as err:  # e.g. diverged: keep what it reached, say why it stopped
                rows = _rows(run_dir)
                vals = [r["val_loss"] for r in rows if "val_loss" in r]
                summary = {
                    "steps": rows[-1]["step"] if rows else 0,
                    "seconds": rows[-1]["seconds"] if rows else 0.0,
                    "best_val_loss": min(vals) if vals else math.nan,
                    "stopped_by": f"error: {err}",
                    "baseline": {},
                }
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log(
                f"[{e.label}] done in {time.perf_counter() - t0:.0f} s: best validation loss {summary['best_val_loss']:.4f}"
                f" (stopped by {summary.get('stopped_by')})"
            )
        rows = _rows(run_dir)
        results[e.label] = {"summary": summary, "rows": rows}
    return results


def run_one(entry: Entry, out_dir) -> dict:
    """``run_entries`` for one entry, printing as it goes (for a process pool's workers)."""
    return run_entries([entry], out_dir, log=lambda s: print(s, flush=True))[entry.label]


def spread(values: Sequence[float], fmt: str) -> str:
    """ "median [min, max]" of the values, each formatted with ``fmt``; "-" when there are none."""
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_curves(
    results: dict,
    out_path,
    *,
    key: str = "val_loss",
    scale: float = 1.0,
    ylabel: str = "validation loss",
    logy: bool = False,
) -> None:
    """Two panels: `key` against steps and against seconds, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, res in results.items():
        pts = [(r["step"], r["seconds"], r[key] * scale) for r in res["rows"] if key in r]
        if not pts:
            continue
        steps, secs, vals = zip(*pts)
        axes[0].plot(steps, vals, label=label)
        axes[1].plot(secs, vals, label=label)
    for ax, xl in zip(axes, ("step", "seconds")):
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
