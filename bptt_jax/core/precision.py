"""The computation dtype: mixed precision for the forward pass and the explicit BPTT.

``RNNSpec(compute_dtype=...)`` chooses it: None (default) computes in the parameters' dtype (float32
or float64) and changes nothing; "bfloat16" or "float16" is the policy below; "float32" computes in
float32 whatever the parameters' dtype.

The policy, in the notes' notation, with c the compute dtype (bfloat16 or float16)::

    X(t), h(-1), W1, W11, b1, W2, b2      cast to c at the call's entry (the parameters stay float32);
                                           a blocked unidirectional stack rounds X(t) to c one block
                                           at a time instead (``rounded``): no rounded copy of X
    Z1(t) = X(t) W1 + h(t-1) W11 + b1      matmuls of c operands, accumulated in float32
    h(t)  = f1(Z1(t))                      f1 in float32, h(t) rounded to c: the states stored across
                                           the sequence are in c; f1'(Z1(t)), a gated cell's gates and the LSTM's c(t)
                                           are recomputed in float32 from them (not read from a
                                           rounded h(t): 1 - h^2 loses its digits where tanh saturates)
    Z2(t), Y(t), Div, DIV                  float32
    dh(t), dZ1(t), dc(t)                   float32: the backward's carries
    dZ1(t) W11^T, X(t)^T dZ1(t), ...       float32 gradients times c values, in float32 (as jax.grad's
                                           transposed products); the "+=" sums over blocks in float32
    dW1, dW11, ..., dDIV/dh(-1), dX        returned in the dtype of what they differentiate (jax.grad
                                           of the same loss rounds dW1, ... to c on the way)

Memory on XLA:CPU. It has no 16-bit matmul: it widens the operands to float32 and, left alone, moves
that widening out of the scans onto the whole stored sequence (a float32 copy of every stored
state: more memory than float32 compute). The scans over blocks therefore read and write their
16-bit arrays bit-cast to uint16 (``hide``) and cast them back per block (``per_block``,
``reveal``): the widening stays inside the loop, one block at a time.

Everything below the entry points follows from the dtypes of the arrays: ``mm`` multiplies two c
operands with float32 accumulation and a float32 operand by a c one in float32, and the backward's
zeros start in ``accumulation(dtype)``. With equal 32- or 64-bit operands ``mm`` is ``a @ b``: the
default computation is the one it was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def is_half(dtype) -> bool:
    """Whether ``dtype`` is a 16-bit float (bfloat16 or float16)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def accumulation(dtype):
    """The dtype sums and carries of ``dtype`` values are kept in: float32 for 16-bit floats, else
    ``dtype`` itself."""
    return jnp.dtype(jnp.float32) if is_half(dtype) else jnp.dtype(dtype)


def mm(a: Array, b: Array) -> Array:
    """``a @ b``: two 16-bit operands multiplied with float32 accumulation and result
    (``preferred_element_type``); a 16-bit operand and a float32 one in float32 (every 16-bit value
    is a float32 one: nothing is rounded); otherwise as ``@`` promotes."""
    if a.dtype == b.dtype and is_half(a.dtype):
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)
    return a @ b


def rounded(x: Array, dtype) -> Array:
    """``x`` rounded to ``dtype`` where that is a 16-bit float (the policy's X(t) in c), else ``x``.

    Idempotent: the blocked unidirectional path keeps X(t) in its dtype and rounds it one block at
    a time inside the scans (XLA keeps that narrowing in the loop), instead of a rounded copy of the
    whole sequence; the other paths round it at the entry and this changes nothing there."""
    return x.astype(dtype) if is_half(dtype) and x.dtype != dtype else x


def hide(tree):
    """The 16-bit float leaves of ``tree`` bit-cast to uint16 (same bits, no rounding): what a scan
    over the sequence reads and writes, undone per block by ``per_block`` (or ``reveal``).

    Why: XLA:CPU multiplies 16-bit matrices by widening them to float32, and its compiler moves that
    widening out of the loop onto the whole sequence, so a scan that reads 16-bit states block by
    block would keep a float32 copy of all of them (more memory than float32 compute: measured in
    benchmarks/results/precision.md). It cannot move a conversion through a bit-cast, so the
    widening stays inside the loop, one block at a time. Without 16-bit leaves nothing changes."""
    f = lambda a: lax.bitcast_convert_type(a, jnp.uint16) if is_half(a.dtype) else a
    return jax.tree_util.tree_map(f, tree)


def per_block(tree, like):
    """``hide`` undone inside a scan body: each leaf of ``tree`` (a slice of a hidden leaf of
    ``like``) back in the dtype of its ``like`` leaf."""
    f = lambda a, r: lax.bitcast_convert_type(a, r.dtype) if is_half(r.dtype) else a
    return jax.tree_util.tree_map(f, tree, like)


def reveal(tree, dtype):
    """``hide`` undone on a scan's stacked outputs whose 16-bit leaves are all of ``dtype``: every
    uint16 leaf bit-cast to ``dtype``."""
    f = lambda a: lax.bitcast_convert_type(a, dtype) if a.dtype == jnp.uint16 else a
    return jax.tree_util.tree_map(f, tree)


def zeros_acc(a: Array) -> Array:
    """Zeros shaped as ``a``, in the dtype its gradients accumulate in."""
    return jnp.zeros(a.shape, accumulation(a.dtype))


def to_compute(compute_dtype: str | None, tree):
    """Every floating leaf of ``tree`` cast to ``compute_dtype`` (None: unchanged)."""
    if compute_dtype is None:
        return tree
    dt = jnp.dtype(compute_dtype)
    return jax.tree_util.tree_map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def like(tree, ref):
    """Every leaf of ``tree`` cast to the dtype of the matching leaf of ``ref`` (gradients back in
    the dtype of what they differentiate); None leaves stay None."""
    return jax.tree_util.tree_map(lambda g, r: None if g is None else g.astype(r.dtype), tree, ref)
