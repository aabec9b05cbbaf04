"""``jax.custom_vjp`` whose backward pass is the explicit BPTT, so ``jax.grad`` of any loss runs it.

    states = rnn_states(params, spec, xs, h0=h0, lengths=lengths)   # [T, B, N_top]
    jax.grad(lambda p: my_loss(rnn_states(p, spec, xs)))(params)     # runs backward.stack_backward
    states, h_last = rnn_states(params, spec, xs, return_last=True)  # and the final states, also
                                                                     # differentiable (a carried state)

Differentiable once: the backward rule is itself not differentiated (``jax.hessian`` and
``jax.jvp`` of the result are not supported). The readout (W2, b2) is not used by the states, so its
gradient is zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bptt_jax.core import backward, checks, forward, kernels, precision
from bptt_jax.core.params import RNNParams, RNNSpec
from bptt_jax.core.plan import Plan, auto_block_size, block_width, resolve_gates

Array = jax.Array


def _plain(spec, unroll, recurrence, params, xs, h0, lengths, store=False):
    """(merged top states, final states in h0's dtype, traces), computed in ``spec.compute_dtype``."""
    cparams, cxs, ch0 = precision.to_compute(spec.compute_dtype, (params, xs, h0))
    traces = forward.run_stack(cparams, spec, cxs, ch0, lengths, unroll=unroll, recurrence=recurrence, store=store)
    last = tuple(s.astype(h.dtype) for s, h in zip(forward.last_states(traces), h0))
    return traces[-1].merged, last, traces


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _states(spec, unroll, recurrence, params, xs, h0, lengths):
    return _plain(spec, unroll, recurrence, params, xs, h0, lengths)[:2]


def _states_fwd(spec, unroll, recurrence, params, xs, h0, lengths):
    dtype = spec.compute_dtype or xs.dtype
    store = resolve_gates("auto", spec, xs.shape[0], xs.shape[1], None, dtype)  # gated cells: keep the gates
    merged, last, traces = _plain(spec, unroll, recurrence, params, xs, h0, lengths, store)
    xs_dtype = jnp.zeros((), xs.dtype)  # dX's dtype; the inputs themselves are in traces[0] (computed)
    return (merged, last), (params, xs_dtype, h0, lengths, traces)


def _states_bwd(spec, unroll, recurrence, residuals, cts):
    """The explicit BPTT (``backward.stack_backward``) in the compute dtype; the cotangents come
    back in the dtypes of the primal inputs."""
    params, xs_dtype, h0, lengths, traces = residuals
    cparams, ch0 = precision.to_compute(spec.compute_dtype, (params, h0))
    ct, ct_last = cts  # ct_last: symbolic zeros arrive as zero arrays
    t_len, batch = ct.shape[:2]
    c = auto_block_size(t_len, batch, max(block_width(spec), ct.shape[-1]))
    whole = recurrence == "pallas" or t_len % c  # residual states are not padded: C must divide T
    p = Plan(
        block=t_len if whole else c, store=False, segment=None, unroll=unroll, recurrence=recurrence, with_dxs=True
    )
    ds_last = tuple(a.astype(precision.accumulation(a.dtype)) for a in ct_last)
    g_layers, g_reverse, dxs, dh0, _ = backward.stack_backward(
        cparams, spec, traces, ch0, lengths, ct, p, ds_last=ds_last
    )
    g_readout = jax.tree_util.tree_map(jnp.zeros_like, params.readout)
    grads, dxs, dh0 = precision.like((RNNParams(g_layers, g_reverse, g_readout), dxs, dh0), (params, xs_dtype, h0))
    return grads, dxs, dh0, None  # lengths: integer, no cotangent


_states.defvjp(_states_fwd, _states_bwd)


GRADS = ("bptt", "autodiff")


def check_grad(grad: str) -> None:
    """``grad`` must be "bptt" (the explicit BPTT) or "autodiff" (``jax.grad`` of the plain scans)."""
    if grad not in GRADS:
        raise ValueError(f"grad: expected 'bptt' or 'autodiff', got {grad!r}")


def rnn_states(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    *,
    h0: tuple | None = None,
    lengths: Array | None = None,
    unroll: int | None = None,
    recurrence: str = "auto",
    return_last: bool = False,
    grad: str = "bptt",
):
    """The top layer's merged states, differentiable (once) through the explicit BPTT.

    Args:
      params, spec: the network (the readout is ignored).
      xs: [T, B, N] inputs.
      h0: L*D entries [B, N1] ((h, c) pairs for the LSTM), zeros when None.
      lengths: [B] valid steps per sequence; padded steps hold the state.
      unroll: scan steps per loop iteration; None picks by backend, as ``bptt_jax.loss``.
      recurrence: "scan", "pallas" or "auto", as ``bptt_jax.loss``.
      return_last: also return every (layer, direction) entry's final state, as ``bptt``'s
        ``h_last`` (L*D entries; (h, c) pairs for the LSTM), differentiable: their cotangents enter
        each entry's reverse recurrence as its first carry.
      grad: "bptt" (the custom VJP) or "autodiff": the same forward scans without it, so that
        ``jax.grad`` differentiates them (the oracle; layers expose it as their ``grad`` option).

    Returns:
      [T, B, N_top] merged top states (N_top = 2*N1 for a concat-merged bidirectional net), or
      (states, h_last) with ``return_last``. Works under jit, vmap and inside lax.scan.
    """
    check_grad(grad)
    xs, h0, lengths = checks.check_inputs(params, spec, xs, h0, lengths)
    rec = kernels.resolve(recurrence, spec.hidden_sizes, spec.compute_dtype or xs.dtype, cell=spec.cell)
    if grad == "bptt":
        states, last = _states(spec, forward.resolve_unroll(unroll), rec, params, xs, h0, lengths)
    else:
        states, last, _ = _plain(spec, forward.resolve_unroll(unroll), rec, params, xs, h0, lengths)
    return (states, spec.public_states(last)) if return_last else states
