"""What every cell provides (``Cell``, checked by mypy against each cell module) and the helpers the
cells share: ``flat`` and the gated cells' initialiser.

Each cell module states one cell in the notes' style; ``p`` is its parameters, s a state [B, W], a(t)
the hoisted input projection A(t) = X(t) Wx + bx, C the steps of a block (scan time).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


class Cell(Protocol):
    """The interface of a cell module (``bptt_jax.core.cells.elman``, ``gru``, ``lstm``).

    Attributes:
      GATES: gate blocks in A(t) and V(t): 1, 3 or 4.
      CACHE: the gate cache kept per step with gates="store", in units of N1 (0: nothing to keep).
      STORE_FROM: gates="auto" stores from this many cached elements on (measured per cell; the cap
        is ``plan.STORE_ELEMENTS``).
      Params: the parameters' NamedTuple type.
    """

    GATES: int
    CACHE: int
    STORE_FROM: int

    @property
    def Params(self) -> type:  # noqa: N802 (the cell module's NamedTuple type)
        ...

    def state_width(self, n1: int) -> int:
        """W, the width of the internal state (N1, or 2 N1 for the LSTM's [h | c])."""
        ...

    def hidden(self, s: Array) -> Array:
        """h(t), the part of the state the next layer and the readout read."""
        ...

    def shapes(self, n_in: int, n1: int) -> Any:
        """The parameters' shapes, as the parameter NamedTuple."""
        ...

    def init(self, keys: Any, shp: Any, *, scheme: str, scale: float, dtype: Any, forget_bias: float = 0.0) -> Any:
        """Initial parameters from NamedTuples of PRNG keys and of shapes."""
        ...

    def project(self, p: Any, xs: Array) -> Array:
        """A = X Wx + bx for many steps at once (one matmul)."""
        ...

    def recur(self, p: Any, activation: str, s_tm1: Array, a_t: Array) -> Array:
        """s(t) from s(t-1) and A(t): the step with its input projection hoisted."""
        ...

    def recur_cache(self, p: Any, activation: str, s_tm1: Array, a_t: Array) -> tuple[Array, Array]:
        """(s(t), the step's gate cache [B, CACHE N1]); the Elman cell's cache is empty."""
        ...

    def recurrent_input(self, p: Any, hs_tm1: Array) -> Array:
        """V = h(t-1) Wh (+ bh) for many steps at once: what ``reverse``'s dV is the gradient of."""
        ...

    def reverse(
        self,
        p: Any,
        activation: str,
        xs: Array,
        s_tm1s: Array,
        ss: Array,
        dhs_above: Array,
        valid: Array | None,
        ds_init: Array | None,
        *,
        with_norms: bool = True,
        unroll: int = 1,
        cache: Array | None = None,
    ) -> tuple[Array, Array, Array, Array | None]:
        """The reverse recurrence of C steps: (dA [C, B, G N1], dV [C, B, G N1], ds(-1) [B, W],
        ||dh(t)|| [C, B] (the LSTM: [C, B, 2] with ||dc(t)||) or None), reading the gates from
        ``cache`` or recomputing them."""
        ...

    def weight_grads(self, p: Any, xs: Array, s_tm1s: Array, das: Array, dvs: Array) -> Any:
        """The "+=" sums over the C steps, as block matmuls (the parameters' NamedTuple)."""
        ...

    def input_grad(self, p: Any, das: Array) -> Array:
        """dA Wx^T [C, B, N_in], the gradient handed to the layer below (or dX)."""
        ...


def flat(a: Array) -> Array:
    """[C, B, F] -> [C*B, F]: the rows of the block matmuls."""
    return a.reshape(-1, a.shape[-1])


def gated_init(params_type: Any, n_gates: int, keys: Any, shp: Any, *, scheme: str, scale: float, dtype: Any):
    """The gated cells' (wx, wh, bx, bh): PyTorch's default, every array U(-1/sqrt(N1), 1/sqrt(N1));
    "orthogonal": Wh's ``n_gates`` gate blocks random orthogonal matrices times ``scale``; "normal":
    weights N(0, scale^2), zero biases."""
    n1 = shp.wh[0]
    if scheme == "normal":
        nrm = lambda kk, s: scale * jax.random.normal(kk, s, dtype)
        return params_type(
            nrm(keys.wx, shp.wx), nrm(keys.wh, shp.wh), jnp.zeros(shp.bx, dtype), jnp.zeros(shp.bh, dtype)
        )
    bound = 1.0 / math.sqrt(n1)
    u = lambda kk, s: jax.random.uniform(kk, s, dtype, -bound, bound)
    wh = u(keys.wh, shp.wh)
    if scheme == "orthogonal":
        ks = jax.random.split(keys.wh, n_gates)
        wh = jnp.concatenate([scale * jax.nn.initializers.orthogonal()(k, (n1, n1), dtype) for k in ks], axis=1)
    return params_type(u(keys.wx, shp.wx), wh, u(keys.bx, shp.bx), u(keys.bh, shp.bh))
