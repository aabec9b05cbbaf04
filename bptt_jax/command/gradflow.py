"""The vanishing / exploding gradient picture: ||dDIV/dh(t)|| against the distance from the loss.

With the divergence on one step only, the explicit BPTT carries dDIV/dh(t) back one step at a time,

    dDIV/dh(t) = dDIV/dZ1(t+1) W11^T = (dDIV/dh(t+1) * f1'(Z1(t+1))) W11^T,

so its norm shrinks or grows roughly geometrically in the distance k from the loss step, at a rate
set by W11's spectral radius rho and by f1' (Bengio, Simard & Frasconi 1994; Pascanu, Mikolov &
Bengio 2013). For f1 = identity and W11 = rho Q with Q orthogonal the rate is exactly rho.
``aux.dh_norms`` of ``bptt(..., diagnostics=True)`` is that norm (batch mean) for every layer and
direction; this module places the loss, reads the profile and fits the rate.

    profile = gradient_flow(params, spec, batch)      # {label: norms by distance k = 0, 1, ...}
    rate, (k0, k1) = fit_rate(profile["layer 1 forward"])

Where the loss sits: on the last step of every sequence for the forward nets (distance k = T-1-t).
A reverse net's last step is t = 0, so its lines come from a second pass with the loss on the first
step (distance k = t); each direction is then seen through its own recurrence.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bptt_jax.core.gradient import bptt
from bptt_jax.core.params import RNNParams, RNNSpec

# Norms outside this range are left out of the fit: a norm is the root of a sum of squares, and in
# float32 the squares of entries below ~1e-19 underflow (above ~1e19 they overflow), which bends the
# measured profile away from the geometric one.
FIT_FLOOR, FIT_CEILING = 1e-15, 1e15


# The LSTM's lines of ||dDIV/dc(t)|| (the constant error carousel's gradient) are named after the h
# line of the same layer and direction with this suffix.
CELL_SUFFIX = " c(t)"


class GradflowError(ValueError):
    """The gradient-flow picture cannot be drawn for these inputs (the message says why)."""


def _one_step_weights(t_len: int, batch: int, step: int) -> np.ndarray:
    w = np.zeros((t_len, batch), np.float32)
    w[step] = 1.0
    return w


def gradient_flow(params: RNNParams, spec: RNNSpec, batch) -> dict[str, np.ndarray]:
    """||dDIV/dh|| (batch mean) for each layer and direction, indexed by the distance from the loss.

    Args:
      params, spec: the network.
      batch: a ``data.Batch`` (xs [T, B, N] and targets); its own weights are replaced by 1 on one
        step: the last for the forward nets, the first for the reverse nets.

    Returns:
      {``spec.state_labels()`` entry: [T] norms, entry k at distance k from the loss step}; for the
      LSTM each entry is followed by ``entry + CELL_SUFFIX``: ||dDIV/dc(t)|| (``aux.dc_norms``), the
      gradient reaching the cell state through the carousel c(t) = f c(t-1) + i g and through h(t).
    """
    xs = jnp.asarray(batch.xs)
    t_len, b = xs.shape[0], xs.shape[1]
    if t_len < 2:
        raise GradflowError(f"gradient flow needs T >= 2 steps, the batch has T = {t_len}")
    labels = spec.state_labels()
    d = spec.num_directions
    out: dict[str, np.ndarray] = {}
    for direction, step in ((0, t_len - 1), (1, 0))[:d]:
        w = jnp.asarray(_one_step_weights(t_len, b, step), xs.dtype)
        _, _, aux = bptt(params, spec, xs, batch.targets, weights=w, diagnostics=True)
        profiles = [("", aux.dh_norms)] + ([(CELL_SUFFIX, aux.dc_norms)] if aux.dc_norms is not None else [])
        for suffix, found in profiles:
            norms = np.asarray(found, np.float64)  # [T, L*D] in input time
            for j, label in enumerate(labels):
                if j % d == direction:
                    out[label + suffix] = norms[::-1, j].copy() if direction == 0 else norms[:, j].copy()
    suffixes = ("", CELL_SUFFIX) if spec.cell == "lstm" else ("",)
    return {label + x: out[label + x] for label in labels for x in suffixes}  # order layer * D + direction


def fit_rate(norms: np.ndarray) -> tuple[float, tuple[int, int] | None]:
    """The per-step factor r of a geometric fit norm(k) ~ a r^k, by least squares on log norm.

    The fit uses distances k >= 1 (the step into the recurrence) whose norm is finite and within
    [FIT_FLOOR, FIT_CEILING], up to the first one that is not. Returns (r, (k_first, k_last)), or
    (nan, None) when fewer than two distances qualify.
    """
    norms = np.asarray(norms, np.float64)
    tail = norms[1:]
    ok = np.isfinite(tail) & (tail >= FIT_FLOOR) & (tail <= FIT_CEILING)
    n = len(ok) if ok.all() else int(np.argmin(ok))  # distances 1..n, up to the first outside the range
    if n < 2:
        return math.nan, None
    ks = np.arange(1, n + 1)
    slope = np.polyfit(ks.astype(np.float64), np.log(norms[ks]), 1)[0]
    return float(math.exp(slope)), (1, n)


def write(profile: dict[str, np.ndarray], out_dir, *, title: str = "", meta: dict | None = None) -> dict:
    """Writes out_dir/gradflow.json (norms and fitted rate per line) and out_dir/gradflow.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[dict] = []
    for label, norms in profile.items():
        rate, span = fit_rate(norms)
        lines.append(
            {
                "label": label,
                "loss_step": "first" if label.removesuffix(CELL_SUFFIX).endswith("reverse") else "last",
                "rate": rate,
                "fit_distances": list(span) if span else None,
                "norms": [float(v) for v in norms],
            }
        )
    record = {**(meta or {}), "lines": lines}
    (out / "gradflow.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    plot(profile, out / "gradflow.png", title=title, rates={l["label"]: l["rate"] for l in lines})
    return record


def plot(profiles: dict[str, np.ndarray], path, *, title: str = "", rates: dict[str, float] | None = None) -> None:
    """Log-scale norm against distance, one labelled line per entry of ``profiles``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, norms in profiles.items():
        k = np.arange(len(norms))
        keep = np.isfinite(norms) & (norms > 0)
        rate = (rates or {}).get(label)
        text = label if rate is None or not math.isfinite(rate) else f"{label} (rate {rate:.3g}/step)"
        ax.semilogy(k[keep], norms[keep], label=text)
    ax.set_xlabel("distance from the loss step, T - 1 - t (reverse nets: t)")
    ax.set_ylabel(
        "mean ||dDIV/dh(t)||" + ("; c(t) lines: ||dDIV/dc(t)||" if any(CELL_SUFFIX in k for k in profiles) else "")
    )
    ax.set_title(title or "gradient reaching h(t), loss on one step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def spectral_radius(w11) -> float:
    """The largest |eigenvalue| of W11 (the rate of a linear network)."""
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(w11, np.float64)))))


def _describe(spec: RNNSpec) -> dict:
    return {
        "input_size": spec.input_size,
        "hidden_sizes": list(spec.hidden_sizes),
        "output_size": spec.output_size,
        "activation": spec.activation,
        "bidirectional": spec.bidirectional,
        "merge": spec.merge if spec.bidirectional else None,
        "cell": spec.cell,
    }


def run(cfg, out_dir, *, from_dir=None, checkpoint: str = "best", log=print) -> dict:
    """``bptt-jax gradflow``: the picture for cfg's network on one training batch of cfg's task.

    Args:
      cfg: a ``config.Config``; the weights are its initialisation unless ``from_dir`` is given.
      out_dir: where gradflow.json and gradflow.png go.
      from_dir: a run directory whose checkpoint supplies the weights. Its network and task must be
        cfg's (sequence length and batch size may differ); otherwise GradflowError.
      checkpoint: "best" (best.ckpt, else last.ckpt) or "last" (last.ckpt) of ``from_dir``.

    Returns:
      The record written to gradflow.json.
    """
    from bptt_jax.command import runner

    runner.check_destination(out_dir)
    task, spec, optimizer = runner.build(cfg)
    source = "initialisation"
    if from_dir is None:
        params = runner.initial_state(cfg, spec, optimizer).params
    else:
        run_dir = Path(from_dir)
        if not (run_dir / "config.toml").exists():
            raise GradflowError(f"--from: {run_dir} is not a run directory (no config.toml)")
        run_cfg, run_task, run_spec, params, ckpt = runner.load_run(run_dir, checkpoint)
        if run_task.name != task.name:
            raise GradflowError(
                f"--from: {run_dir} trained task {run_task.name!r}, the config asks for task {task.name!r}"
            )
        mine, theirs = _describe(spec), _describe(run_spec)
        diff = [f"{k}: run {theirs[k]!r}, config {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
        if diff:
            raise GradflowError(f"--from: {run_dir} trained another network ({'; '.join(diff)})")
        source = str(ckpt)
    batch = task.train_batch(0)
    profile = gradient_flow(params, spec, batch)
    meta = {
        "weights": source,
        "task": task.name,
        "T": int(batch.xs.shape[0]),
        "batch_size": int(batch.xs.shape[1]),
        "network": _describe(spec),
        "init": cfg.model.init,
        "init_scale": cfg.model.init_scale,
    }
    kind = spec.activation if spec.cell == "elman" else spec.cell
    title = f"{kind}, W11 init {cfg.model.init} x {cfg.model.init_scale:g}, T = {meta['T']} ({source})"
    nets = list(params.layers) + list(params.reverse_layers)
    order = [k * spec.num_directions + d for d in range(spec.num_directions) for k in range(spec.num_layers)]
    if spec.cell == "elman":  # a gated cell has no square W11 ([N1, G N1]): no spectral radius to give
        radius = {spec.state_labels()[j]: spectral_radius(net.w11) for j, net in zip(order, nets)}
        meta["w11_spectral_radius"] = radius
    record = write(
        profile, out_dir, title=title if from_dir is None else f"{kind}, T = {meta['T']}, trained", meta=meta
    )
    for line in record["lines"]:
        rho = f"; W11 spectral radius {radius[line['label']]:.4g}" if spec.cell == "elman" else ""
        log(f"{line['label']}: fitted rate {line['rate']:.4g} per step over distances {line['fit_distances']}{rho}")
    return record
