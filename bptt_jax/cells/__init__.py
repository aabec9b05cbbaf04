"""The cells: the part of the lecture notes that changes from one recurrent network to another.

Each module states one cell in the notes' style: its parameters (a NamedTuple) and their shapes, its
state, the hoisted input projection A(t) = X(t) Wx + bx, the step, the step's backward written out,
and the weight-gradient sums. Everything around a cell (time blocks, stacks, directions, lengths,
segments, the custom VJP, training) is the same BPTT for every cell (``bptt_jax.bptt``).

The state one (layer, direction) carries across time is ONE array [B, W] inside the package:
h [B, N1] for the Elman and GRU cells, h and c side by side [B, 2 N1] for the LSTM. The public
calls take and return the LSTM's state as an (h, c) pair (``bptt_jax.params.RNNSpec``).

The interface every cell module provides (``p`` its parameters, s a state, a(t) the projection)::

    GATES                                  gate blocks in A(t) and V(t): 1, 3 or 4
    CACHE                                  the gate cache kept per step with gates="store", in units of
                                           N1 (0: the Elman cell keeps nothing; GRU and LSTM 4)
    STORE_FROM                             gates="auto" stores from this many cached elements on
                                           (measured per cell; the cap is bptt.STORE_ELEMENTS)
    state_width(n1)                        W, the width of the internal state
    hidden(s)                              h(t), the part of the state the next layer and the readout read
    shapes(n_in, n1)                       the parameters' shapes, as the parameter NamedTuple
    project(p, xs)                         A = X Wx + bx for many steps at once (one matmul)
    recur(p, activation, s_tm1, a_t)       s(t) from s(t-1) and A(t): the step with its input hoisted
    recur_cache(p, activation, s_tm1, a_t) (s(t), the step's gate cache): gated cells only
    reverse(p, activation, xs, s_tm1s, ss, dhs_above, valid, ds_init, *, with_norms, unroll, cache)
                                           the reverse recurrence of C steps: (dA, dV, ds(-1), ||dh(t)||),
                                           reading the gates from ``cache`` or recomputing them
    weight_grads(p, xs, s_tm1s, das, dvs)  the "+=" sums over the C steps, as block matmuls
    input_grad(p, das)                     dA Wx^T, the gradient handed to the layer below (or dX)
"""

from __future__ import annotations

from types import ModuleType

from bptt_jax.cells import elman, gru, lstm

CELLS: dict[str, ModuleType] = {"elman": elman, "gru": gru, "lstm": lstm}
NAMES = tuple(CELLS)


def get(name: str) -> ModuleType:
    """The cell module called ``name`` (one of ``NAMES``)."""
    try:
        return CELLS[name]
    except KeyError:
        raise ValueError(f"cell: unknown value {name!r}; allowed: {list(NAMES)}") from None


def of(p) -> ModuleType:
    """The cell module whose parameters ``p`` are (by their NamedTuple type)."""
    for mod in CELLS.values():
        if isinstance(p, mod.Params):
            return mod
    raise TypeError(f"expected the parameters of a cell ({', '.join(NAMES)}), got {type(p).__name__}")
