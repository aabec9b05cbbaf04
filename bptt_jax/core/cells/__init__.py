"""The cells: the part of the lecture notes that changes from one recurrent network to another.

Each module states one cell in the notes' style: its parameters (a NamedTuple) and their shapes, its
state, the hoisted input projection A(t) = X(t) Wx + bx, the step, the step's backward written out,
and the weight-gradient sums. Everything around a cell (time blocks, stacks, directions, lengths,
segments, the custom VJP, training) is the same BPTT for every cell (``bptt_jax.core.backward``).

The state one (layer, direction) carries across time is ONE array [B, W] inside the package:
h [B, N1] for the Elman and GRU cells, h and c side by side [B, 2 N1] for the LSTM. The public
calls take and return the LSTM's state as an (h, c) pair (``bptt_jax.core.params.RNNSpec``).

The interface every cell module provides is the protocol ``base.Cell`` (mypy checks each module
against it through ``CELLS``).
"""

from __future__ import annotations

from bptt_jax.core.cells import elman, gru, lstm
from bptt_jax.core.cells.base import Cell

CELLS: dict[str, Cell] = {"elman": elman, "gru": gru, "lstm": lstm}
NAMES = tuple(CELLS)


def get(name: str) -> Cell:
    """The cell module called ``name`` (one of ``NAMES``)."""
    try:
        return CELLS[name]
    except KeyError:
        raise ValueError(f"cell: unknown value {name!r}; allowed: {list(NAMES)}") from None


def name_of(p) -> str:
    """The name (a key of ``CELLS``) of the cell whose parameters ``p`` are."""
    mod = of(p)
    return next(name for name, m in CELLS.items() if m is mod)


def of(p) -> Cell:
    """The cell module whose parameters ``p`` are (by their NamedTuple type)."""
    for mod in CELLS.values():
        if isinstance(p, mod.Params):
            return mod
    raise TypeError(f"expected the parameters of a cell ({', '.join(NAMES)}), got {type(p).__name__}")
