"""Backpropagation through time, written out: an explicit reverse ``lax.scan`` per layer.

For one layer (one direction), from t = T-1 down to 0 (lecture notes' notation, row vectors):

    dh(t)  = dH_above(t) + dZ1(t+1) W11^T      dH_above: dZ2(t) W2^T at the top layer, the gradient
                                               arriving from the layer above otherwise; dZ1(T) = 0
    dZ1(t) = dh(t) * f1'(Z1(t))                f1' computed from h(t)
    dW1 += X(t)^T dZ1(t)    dW11 += h(t-1)^T dZ1(t)    db1 += dZ1(t)
    dh(-1) = dZ1(0) W11^T

The scan's carry is dZ1(t+1) W11^T only; the "+=" sums are done after the scan as single matmuls
over all T*B rows. Padded steps (t >= length) held the state in the forward pass, so there
dZ1(t) = 0 and dh passes through to h(t-1) unchanged.

A bidirectional layer's reverse net ran over reversed time, so its BPTT is the same reverse scan on
reversed time: it runs from input time 0 up to T-1.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import activations, checks, losses, scan
from bptt_jax.params import LayerParams, ReadoutParams, RNNParams, RNNSpec

Array = jax.Array


class BPTTAux(NamedTuple):
    """Diagnostics of one BPTT pass. Per-(layer, direction) entries are ordered layer * D + direction."""

    dh0: tuple[Array, ...]  # L*D entries [B, N1]: dDIV/dh(-1)
    dxs: Array  # [T, B, N] dDIV/dX
    dh_norms: Array  # [T, L*D] ||dDIV/dh(t)|| averaged over the batch, in input time
    h_last: tuple[Array, ...]  # L*D entries [B, N1]: the forward pass's final states (as forward's)


def layer_backward(
    w11: Array,
    activation: str,
    hs: Array,
    dhs_above: Array,
    valid: Optional[Array],
    *,
    dh_init: Optional[Array] = None,
    with_norms: bool = True,
    unroll: int = 1,
) -> tuple[Array, Array, Optional[Array]]:
    """The reverse scan of one layer (one direction), in its own scan time.

    Equals the Python loop:

        carry = 0                                 # dZ1(T) W11^T
        for t in reversed(range(T)):
            dh = dhs_above[t] + carry             # dh(t)
            dz1[t] = dh * f1'(hs[t])              # 0 where not valid[t]
            carry = dz1[t] @ w11.T                # dh where not valid[t]: padding passes dh through
        dh_m1 = carry                             # dDIV/dh(-1)

    Args:
      w11: [N1, N1] W11.
      activation: f1's name.
      hs: [T, B, N1] h(t) from the forward scan.
      dhs_above: [T, B, N1] gradient reaching h(t) from outside the recurrence.
      valid: [T, B] booleans or None.
      dh_init: [B, N1] the recurrent gradient entering from beyond the last step (dZ1(T) W11^T);
        zeros when None. Segment-wise BPTT (``recompute``) passes the previous segment's carry.
      with_norms: also return the norm of dh(t) (the diagnostics); skipped when False.

    Returns:
      (dz1s [T, B, N1], dh_m1 [B, N1], dh_norm [T, B] the norm of dh(t) per sequence, or None).
    """
    df = activations.hidden(activation).df_from_h
    w11_t = w11.T

    def body(carry, inp):
        dh_above_t, h_t, valid_t = inp
        dh_t = dh_above_t + carry  # [B, N1]
        dz1_t = dh_t * df(h_t)
        if valid_t is None:
            carry = dz1_t @ w11_t
        else:
            dz1_t = jnp.where(valid_t[:, None], dz1_t, 0.0)
            carry = jnp.where(valid_t[:, None], dz1_t @ w11_t, dh_t)
        norm = jnp.sqrt(jnp.sum(dh_t * dh_t, axis=-1)) if with_norms else None
        return carry, (dz1_t, norm)

    init = jnp.zeros_like(hs[0]) if dh_init is None else dh_init
    dh_m1, (dz1s, dh_norm) = lax.scan(body, init, (dhs_above, hs, valid), reverse=True, unroll=unroll)
    return dz1s, dh_m1, dh_norm


def _flat(a: Array) -> Array:
    return a.reshape(-1, a.shape[-1])  # [T*B, F]


def layer_weight_grads(xs: Array, h0: Array, hs: Array, dz1s: Array) -> LayerParams:
    """dW1 = sum_t X(t)^T dZ1(t), dW11 = sum_t h(t-1)^T dZ1(t), db1 = sum_t dZ1(t), as single matmuls.

    xs: [T, B, N_in], h0: [B, N1], hs: [T, B, N1], dz1s: [T, B, N1], all in the layer's scan time.
    """
    hs_tm1 = jnp.concatenate([h0[None], hs[:-1]], axis=0)  # [T, B, N1] h(t-1)
    dz = _flat(dz1s)
    return LayerParams(_flat(xs).T @ dz, _flat(hs_tm1).T @ dz, jnp.sum(dz, axis=0))


def stack_backward(
    params: RNNParams,
    spec: RNNSpec,
    traces: tuple[scan.LayerTrace, ...],
    h0: tuple[Array, ...],
    lengths: Optional[Array],
    dmerged_top: Array,
    *,
    dh_init: Optional[tuple[Array, ...]] = None,
    with_norms: bool = True,
    with_dxs: bool = True,
    unroll: int = 1,
):
    """BPTT through the whole stack, top layer first.

    Args:
      traces: the forward pass's ``scan.run_stack`` output.
      h0: L*D entries [B, N1].
      dmerged_top: [T, B, N_top] dDIV/d(top layer's merged states), in input time.
      dh_init: L*D entries [B, N1], recurrent gradients entering from beyond T-1 (unidirectional
        only; for segment-wise BPTT). Zeros when None.
      with_norms: compute dh_norms (else None).
      with_dxs: compute dxs = dDIV/dX (else None).

    Returns:
      (layers grads, reverse_layers grads, dxs [T, B, N], dh0 (L*D), dh_norms [T, L*D]).
    """
    t_len = dmerged_top.shape[0]
    valid = scan.valid_mask(lengths, t_len)
    d = spec.num_directions
    n_layers = spec.num_layers
    g_layers = [None] * n_layers
    g_reverse = [None] * n_layers
    dh0 = [None] * (n_layers * d)
    norms = [None] * (n_layers * d)
    dmerged = dmerged_top
    for k in reversed(range(n_layers)):  # a loop over layers, not time
        tr = traces[k]
        n1 = spec.hidden_sizes[k]
        if not spec.bidirectional:
            parts = (dmerged,)
        elif spec.merge == "concat":
            parts = (dmerged[..., :n1], dmerged[..., n1:])
        else:
            parts = (dmerged, dmerged)
        dinputs = None
        for j in range(d):
            layer = params.layers[k] if j == 0 else params.reverse_layers[k]
            above = parts[j] if j == 0 else scan.reverse_padded(parts[j], lengths)  # scan time
            xs_scan = tr.inputs if j == 0 else scan.reverse_padded(tr.inputs, lengths)
            dz1s, dh_m1, dh_norm = layer_backward(
                layer.w11, spec.activation, tr.states[j], above, valid,
                dh_init=None if dh_init is None else dh_init[k * d + j], with_norms=with_norms, unroll=unroll,
            )
            grads = layer_weight_grads(xs_scan, h0[k * d + j], tr.states[j], dz1s)
            if k > 0 or with_dxs:
                dx = dz1s @ layer.w1.T  # [T, B, N_in] in scan time
                dx = dx if j == 0 else scan.reverse_padded(dx, lengths)
                dinputs = dx if dinputs is None else dinputs + dx
            if with_norms:
                dh_norm = dh_norm if j == 0 else scan.reverse_padded(dh_norm, lengths)
                norms[k * d + j] = jnp.mean(dh_norm, axis=1)  # [T]
            (g_layers if j == 0 else g_reverse)[k] = grads
            dh0[k * d + j] = dh_m1
        dmerged = dinputs
    dh_norms = jnp.stack(norms, axis=1) if with_norms else None
    return tuple(g_layers), tuple(g for g in g_reverse if g is not None), dmerged, tuple(dh0), dh_norms


def _readout(params: RNNParams, spec: RNNSpec, top: Array):
    z2s = top @ params.readout.w2 + params.readout.b2  # [T, B, M], Z2(t) = h(t) W2 + b2
    return z2s, activations.output(spec.output_activation, z2s)


def readout_backward(params: RNNParams, spec: RNNSpec, top: Array, targets: Array, w: Array, *,
                     generic: bool = False):
    """The output layer, forward and backward, for all t at once.

    Args:
      top: [T, B, N_top] the readout's input (the top layer's merged states, after any dropout).
      targets: [T, B] or [T, B, M]; w: [T, B] effective weights.

    Returns:
      (DIV, readout grads, dDIV/dtop [T, B, N_top] = dZ2(t) W2^T).
    """
    z2s, ys = _readout(params, spec, top)
    div = losses.total(losses.divergence(spec.divergence, z2s, ys, targets), w)
    dz2s = losses.output_grad(spec.divergence, spec.output_activation, z2s, ys, targets, w, generic=generic)
    g_readout = ReadoutParams(_flat(top).T @ _flat(dz2s), jnp.sum(dz2s, axis=(0, 1)))
    return div, g_readout, dz2s @ params.readout.w2.T


@functools.partial(jax.jit, static_argnames=("spec", "unroll"))
def _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll):
    """(DIV, final states): the plain forward computation that ``jax.grad`` differentiates."""
    traces = scan.run_stack(params, spec, xs, h0, lengths, unroll=unroll)
    top = traces[-1].merged
    if output_mask is not None:
        top = top * output_mask
    z2s, ys = _readout(params, spec, top)
    w = losses.effective_weights(weights, lengths, xs.shape[0], xs.shape[1], xs.dtype)
    h_last = tuple(h[-1] for tr in traces for h in tr.states)
    return losses.total(losses.divergence(spec.divergence, z2s, ys, targets), w), h_last


@functools.partial(jax.jit, static_argnames=("spec", "generic", "unroll", "diagnostics"))
def _bptt(params, spec, xs, targets, weights, lengths, h0, output_mask, generic, unroll, diagnostics=True):
    t_len, batch, _ = xs.shape
    traces = scan.run_stack(params, spec, xs, h0, lengths, unroll=unroll)  # stores h(t) only
    top = traces[-1].merged  # [T, B, N_top]
    if output_mask is not None:
        top = top * output_mask  # dropout on the readout's input
    w = losses.effective_weights(weights, lengths, t_len, batch, xs.dtype)
    div, g_readout, dtop = readout_backward(params, spec, top, targets, w, generic=generic)
    if output_mask is not None:
        dtop = dtop * output_mask
    g_layers, g_reverse, dxs, dh0, dh_norms = stack_backward(
        params, spec, traces, h0, lengths, dtop, with_norms=diagnostics, with_dxs=diagnostics, unroll=unroll
    )
    h_last = tuple(h[-1] for tr in traces for h in tr.states)
    return div, RNNParams(g_layers, g_reverse, g_readout), BPTTAux(dh0, dxs, dh_norms, h_last)


def loss(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    targets: Array,
    *,
    weights: Optional[Array] = None,
    lengths: Optional[Array] = None,
    h0: Optional[tuple[Array, ...]] = None,
    output_mask: Optional[Array] = None,
    unroll: int = 1,
    check_finite: bool = False,
) -> Array:
    """DIV = mean over the batch of sum over t of w(t) Div(Y(t), D(t)). Differentiable by jax.grad.

    Args:
      params, spec: the network.
      xs: [T, B, N] inputs.
      targets: cross_entropy: [T, B] integer classes in [0, M) or [T, B, M] probabilities;
        otherwise [T, B, M] floats D(t).
      weights: [T, B] w(t) ("removes" outputs where 0; many-to-one puts 1 at the last valid step
        only). Ones when None. Steps t >= lengths[b] always weigh 0.
      lengths: [B] valid steps per sequence.
      h0: L*D entries [B, N1] (order layer * D + direction), zeros when None.
      output_mask: [T, B, N_top] multiplies the top layer's merged states before the readout
        (dropout on the outputs: zeros and 1/(1-p)); None for no dropout.
      unroll: scan steps per loop iteration.
      check_finite: raise ValueError on NaN or inf in xs, h0 or params.

    Returns:
      The scalar DIV.
    """
    xs, h0, lengths = checks.check_inputs(params, spec, xs, h0, lengths, check_finite=check_finite)
    targets, weights = checks.check_targets(spec, targets, weights, xs.shape[0], xs.shape[1])
    output_mask = checks.check_output_mask(spec, output_mask, xs.shape[0], xs.shape[1])
    return _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll)[0]


def loss_and_state(params, spec, xs, targets, *, weights=None, lengths=None, h0=None, output_mask=None,
                   unroll: int = 1):
    """(DIV, final states) — ``loss`` plus the L*D final states, for ``jax.value_and_grad(...,
    has_aux=True)`` in truncated BPTT (one forward pass gives both). Arguments as ``loss``."""
    xs, h0, lengths = checks.check_inputs(params, spec, xs, h0, lengths)
    targets, weights = checks.check_targets(spec, targets, weights, xs.shape[0], xs.shape[1])
    output_mask = checks.check_output_mask(spec, output_mask, xs.shape[0], xs.shape[1])
    return _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll)


def bptt(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    targets: Array,
    *,
    weights: Optional[Array] = None,
    lengths: Optional[Array] = None,
    h0: Optional[tuple[Array, ...]] = None,
    output_mask: Optional[Array] = None,
    generic: bool = False,
    unroll: int = 1,
    checkpoint_every: Optional[int] = None,
    diagnostics: bool = True,
    check_finite: bool = False,
) -> tuple[Array, RNNParams, BPTTAux]:
    """DIV and its gradient by the explicit reverse-scan BPTT (arguments as ``loss``).

    One forward scan per layer and direction stores h(t) only; dDIV/dZ2 is formed for all t at
    once; then each layer, top to bottom, runs ``layer_backward``; weight gradients are single
    matmuls over all T*B rows.

    Args:
      generic: form dDIV/dZ2 by the generic path (dDIV/dY times the full Jacobian for softmax)
        instead of the fused closed form; the two agree (tests show it).
      checkpoint_every: store the states only every k steps and recompute each k-step segment in
        the backward pass (``recompute.bptt_segments``): memory ~ T/k + k instead of T, same
        gradients. Unidirectional networks without output_mask only.
      diagnostics: compute ``aux.dxs`` and ``aux.dh_norms``; False skips them (they are then None)
        and saves one matmul per step.

    Returns:
      (DIV, grads with exactly the structure of params, ``BPTTAux(dh0, dxs, dh_norms, h_last)``).
    """
    xs, h0, lengths = checks.check_inputs(params, spec, xs, h0, lengths, check_finite=check_finite)
    targets, weights = checks.check_targets(spec, targets, weights, xs.shape[0], xs.shape[1])
    output_mask = checks.check_output_mask(spec, output_mask, xs.shape[0], xs.shape[1])
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every: expected a positive int or None, got {checkpoint_every!r}")
        if spec.bidirectional:
            raise ValueError("checkpoint_every: segment recomputation needs a unidirectional network "
                             "(spec.bidirectional=True)")
        if output_mask is not None:
            raise ValueError("checkpoint_every: cannot be combined with output_mask")
        from bptt_jax.recompute import bptt_segments

        return bptt_segments(params, spec, xs, targets, weights, lengths, h0, checkpoint_every,
                             generic=generic, unroll=unroll, diagnostics=diagnostics)
    return _bptt(params, spec, xs, targets, weights, lengths, h0, output_mask, generic, unroll, diagnostics)
