"""Which biases a framework layer trains: PyTorch's two per gate, or exactly the cell's it was made from.

The core BPTT always reads the cell's full parameters (Elman: w1, w11, b1; GRU and LSTM: wx, wh, bx,
bh, PyTorch's layout). A framework's cell may hold fewer biases: ``nnx.GRUCell`` has bx only (no
recurrent bias), ``nnx.LSTMCell`` / ``OptimizedLSTMCell`` bh only, ``eqx.nn.LSTMCell`` one bias (bx
here), ``eqx.nn.GRUCell`` bx and the n gate's recurrent bias b_hn alone (``bias_n``). A layer that
trains two biases where the cell has one moves their sum twice as far at every optimizer step, so a
switched model would train differently. Here a missing bias is a zero that is not a trainable array:

    layout     GRU trains            LSTM trains
    pytorch    wx, wh, bx, bh        wx, wh, bx, bh        (nn.GRU / nn.LSTM; the layers' default)
    flax       wx, wh, bx            wx, wh, bh            (nnx.GRUCell; nnx.LSTMCell, OptimizedLSTMCell)
    equinox    wx, wh, bx, bh_n      wx, wh, bx            (eqx.nn.GRUCell's bias, bias_n; eqx.nn.LSTMCell)
    none       wx, wh                wx, wh                (a cell made with use_bias=False)

The Elman cell has one bias, b1, in every layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bptt_jax.core import cells

Array = jax.Array

LAYOUTS = ("pytorch", "flax", "equinox", "none")
_GATED = {
    ("gru", "pytorch"): ("wx", "wh", "bx", "bh"),
    ("gru", "flax"): ("wx", "wh", "bx"),
    ("gru", "equinox"): ("wx", "wh", "bx", "bh_n"),
    ("lstm", "pytorch"): ("wx", "wh", "bx", "bh"),
    ("lstm", "flax"): ("wx", "wh", "bh"),
    ("lstm", "equinox"): ("wx", "wh", "bx"),
    ("gru", "none"): ("wx", "wh"),
    ("lstm", "none"): ("wx", "wh"),
}


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"biases: expected one of {list(LAYOUTS)}, got {layout!r}")


def names(cell: str, layout: str) -> tuple[str, ...]:
    """The trainable arrays' names, in order."""
    check_layout(layout)
    return ("w1", "w11", "b1") if cell == "elman" else _GATED[(cell, layout)]


def split(cell: str, layout: str, p) -> dict[str, Array]:
    """The trainable arrays of the full parameters ``p`` in ``layout``. A bias the layout does not
    train is folded into the one it does where the cell's function allows it (the r, z gates' and the
    LSTM's biases act through their sum); the GRU's b_hn sits inside r * (h W_hn + b_hn) and is
    dropped by the "flax" layout (``nnx.GRUCell`` has none); "none" drops every bias."""
    keep = names(cell, layout)
    if cell == "elman" or layout == "pytorch":
        return dict(zip(keep, p))
    if layout == "none":
        return {"wx": p.wx, "wh": p.wh}
    if cell == "lstm":
        total = p.bx + p.bh
        return {"wx": p.wx, "wh": p.wh, keep[2]: total}
    n1 = p.wh.shape[0]
    bx = p.bx.at[: 2 * n1].add(p.bh[: 2 * n1])  # r, z: only the sum counts
    out = {"wx": p.wx, "wh": p.wh, "bx": bx}
    if layout == "equinox":
        out["bh_n"] = p.bh[2 * n1 :]
    return out


def join(cell: str, layout: str, arrays: dict[str, Array]):
    """The full parameters (the cell's NamedTuple) from the trainable ``arrays``: zeros where the
    layout has no bias."""
    Params = cells.get(cell).Params
    if cell == "elman" or layout == "pytorch":
        return Params(*(arrays[n] for n in names(cell, layout)))
    wx, wh = arrays["wx"], arrays["wh"]
    zeros = jnp.zeros((wh.shape[1],), wh.dtype)
    bx = arrays.get("bx", zeros)
    bh = arrays.get("bh", zeros)
    if "bh_n" in arrays:
        n1 = wh.shape[0]
        bh = zeros.at[2 * n1 :].set(arrays["bh_n"])
    return Params(wx, wh, bx, bh)
