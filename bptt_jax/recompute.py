"""BPTT that stores states only every k steps and recomputes each segment in the backward pass.

Plain BPTT keeps h(t) for all T steps. Here the forward pass keeps only the state entering each
segment of k steps (T/k boundary states per layer); the backward pass walks the segments from the
last to the first, re-runs the forward scan inside the segment from its boundary state, and runs the
ordinary reverse scan (``bptt.stack_backward``) over those k steps, carrying dh (one [B, N1] per
layer) from segment to segment and adding up the weight gradients. Stored activations grow like
T/k + k instead of T, for about one extra forward pass of compute. The gradients are the plain
BPTT's (tests show it); only unidirectional networks (a reverse net runs the other way in time).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax import losses, scan
from bptt_jax.bptt import BPTTAux, readout_backward, stack_backward
from bptt_jax.params import RNNParams, RNNSpec


def _pad_time(a, pad):
    if a is None or pad == 0:
        return a
    return jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)


@functools.partial(jax.jit, static_argnames=("spec", "every", "generic", "unroll", "diagnostics"))
def bptt_segments(params: RNNParams, spec: RNNSpec, xs, targets, weights, lengths, h0, every: int,
                  generic: bool = False, unroll: int = 1, diagnostics: bool = True):
    """(DIV, grads, aux) as ``bptt.bptt``, storing only every ``every``-th state (see module doc)."""
    t_len, batch, _ = xs.shape
    k = every
    n_seg = math.ceil(t_len / k)
    pad = n_seg * k - t_len
    w = losses.effective_weights(weights, lengths, t_len, batch, xs.dtype)  # [T, B]
    if pad and lengths is None:
        lengths = jnp.full((batch,), t_len, jnp.int32)  # the padded steps hold the state
    xs_p, tg_p, w_p = _pad_time(xs, pad), _pad_time(targets, pad), _pad_time(w, pad)
    seg = lambda a: a.reshape((n_seg, k) + a.shape[1:])
    xs_s, tg_s, w_s = seg(xs_p), seg(tg_p), seg(w_p)
    if lengths is None:
        lens_s = None
    else:
        starts = jnp.arange(n_seg) * k
        lens_s = jnp.clip(lengths[None, :] - starts[:, None], 0, k).astype(jnp.int32)  # [S, B]

    def seg_forward(h, inp):  # h: L entries [B, N1], the state entering the segment
        x_seg, lens = inp
        traces = scan.run_stack(params, spec, x_seg, h, lens, unroll=unroll)
        return tuple(tr.states[0][-1] for tr in traces), h

    h_last, boundaries = lax.scan(seg_forward, h0, (xs_s, lens_s))  # boundaries: L entries [S, B, N1]

    zero_g = jax.tree_util.tree_map(jnp.zeros_like, params)

    def seg_backward(carry, inp):
        dh_next, g_acc, div_acc = carry
        x_seg, tg_seg, w_seg, lens, h_start = inp
        traces = scan.run_stack(params, spec, x_seg, h_start, lens, unroll=unroll)  # recompute k steps
        div, g_readout, dtop = readout_backward(params, spec, traces[-1].merged, tg_seg, w_seg, generic=generic)
        g_layers, _, dxs, dh_start, norms = stack_backward(
            params, spec, traces, h_start, lens, dtop, dh_init=dh_next,
            with_norms=diagnostics, with_dxs=diagnostics, unroll=unroll,
        )
        g = RNNParams(g_layers, (), g_readout)
        g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
        return (dh_start, g_acc, div_acc + div), (dxs, norms)

    init = (tuple(jnp.zeros_like(h) for h in h0), zero_g, jnp.zeros((), xs.dtype))
    (dh0, grads, div), (dxs, norms) = lax.scan(
        seg_backward, init, (xs_s, tg_s, w_s, lens_s, boundaries), reverse=True
    )
    if diagnostics:
        dxs = dxs.reshape((n_seg * k,) + dxs.shape[2:])[:t_len]
        norms = norms.reshape((n_seg * k,) + norms.shape[2:])[:t_len]
    return div, grads, BPTTAux(dh0, dxs, norms, h_last)

