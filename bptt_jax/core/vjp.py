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

import dataclasses
import functools

import jax
import jax.numpy as jnp

from bptt_jax.core import backward, budget, checks, forward, kernels, precision, segments
from bptt_jax.core.params import RNNParams, RNNSpec
from bptt_jax.core.plan import (
    Options,
    Plan,
    auto_block_size,
    block_width,
    elman_kernel_block,
    fill_tuned,
    native_whole,
    resolve_gates,
    segment_levels,
    tuned_entry,
)

Array = jax.Array


def _plain(spec, unroll, recurrence, params, xs, h0, lengths, store=False, block_size=None):
    """(merged top states, final states in h0's dtype, traces), computed in ``spec.compute_dtype``;
    the input projections ``block_size`` steps at a time (None: all at once)."""
    cparams, cxs, ch0 = precision.to_compute(spec.compute_dtype, (params, xs, h0))
    traces = forward.run_stack(
        cparams, spec, cxs, ch0, lengths, unroll=unroll, block_size=block_size, recurrence=recurrence, store=store
    )
    last = tuple(s.astype(h.dtype) for s, h in zip(forward.last_states(traces), h0))
    return traces[-1].merged, last, traces


def _segmented(spec, unroll, recurrence, every, params, xs, h0, lengths):
    """``_plain`` with checkpoint segments of k steps, k dividing T (unidirectional stacks): (merged top states,
    final states in h0's dtype, the state entering each segment: L entries [T/k, B, W]). One scan
    runs the stack k steps at a time (nested segments, ``every`` a tuple: k_last steps at a time,
    ``segments.chunked_forward``), so across the sequence it keeps only the top layer's states (the
    output) and the outermost level's boundary states (the backward pass finds the inner ones)."""
    cparams, cxs, ch0 = precision.to_compute(spec.compute_dtype, (params, xs, h0))
    levels = segment_levels(every)
    plan = Plan(block=levels[-1], store=False, segment=None, unroll=unroll, recurrence=recurrence)
    h_last, boundaries, top = segments.chunked_forward(
        cparams, spec, cxs, ch0, lengths, plan, levels[-1], levels[0], keep_top=True
    )
    last = tuple(s.astype(h.dtype) for s, h in zip(h_last, h0))
    assert top is not None and boundaries is not None  # keep_top, and every is a level
    return top, last, boundaries


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _states(spec, unroll, recurrence, layout, params, xs, h0, lengths):
    if layout[2] is not None and not spec.bidirectional:
        return _segmented(spec, unroll, recurrence, layout[2], params, xs, h0, lengths)[:2]
    c = _block(spec, layout, xs.shape[0], xs.shape[1], block_width(spec), recurrence)  # as _states_fwd
    return _plain(spec, unroll, recurrence, params, xs, h0, lengths, block_size=c)[:2]


def _block(spec: RNNSpec, layout: tuple, t_len: int, batch: int, width: int, recurrence: str) -> int:
    """The backward's time block C for ``layout`` = (gates, block_size, segments) as asked: None
    resolves by ``auto_block_size`` (``width``: the widest per-step buffer), or with the compiled
    kernel and the gates kept to the whole sequence where ``plan.native_whole`` says so (as
    ``bptt``'s plan); C must divide T (the residual states are not padded), so a C that does not
    becomes the whole sequence, as with the kernels."""
    if layout[1] is None and recurrence == "native":  # float32 (kernels.resolve)
        store = resolve_gates(layout[0], spec, t_len, batch, layout[2], jnp.float32)
        if native_whole(spec, t_len, batch, store):
            return t_len
    c = layout[1] or auto_block_size(t_len, batch, width)
    if layout[1] is None and recurrence == "native" and spec.cell == "elman":  # as bptt's plan
        c = elman_kernel_block(spec, t_len, batch, c)
    return t_len if recurrence == "pallas" or t_len % c else c


def _states_fwd(spec, unroll, recurrence, layout, params, xs, h0, lengths):
    # The forward projects X(t) W1 by the backward's time blocks: a whole-sequence projection (and a
    # gated cell's per-gate slices of it) would be the largest temp buffer of the call.
    c = _block(spec, layout, xs.shape[0], xs.shape[1], block_width(spec), recurrence)
    if layout[2] is not None and spec.bidirectional:  # segments: the backward finds its boundaries
        merged, last, _ = _plain(spec, unroll, recurrence, params, xs, h0, lengths, block_size=c)
        return (merged, last), (params, xs, h0, lengths, None)
    if layout[2] is not None:  # checkpoint segments: the boundary states are the residuals
        merged, last, boundaries = _segmented(spec, unroll, recurrence, layout[2], params, xs, h0, lengths)
        return (merged, last), (params, xs, h0, lengths, boundaries)
    store = resolve_gates(layout[0], spec, xs.shape[0], xs.shape[1], None, spec.compute_dtype or xs.dtype)
    merged, last, traces = _plain(spec, unroll, recurrence, params, xs, h0, lengths, store, c)
    xs_dtype = jnp.zeros((), xs.dtype)  # dX's dtype; the inputs themselves are in traces[0] (computed)
    return (merged, last), (params, xs_dtype, h0, lengths, traces)


def _states_bwd(spec, unroll, recurrence, layout, residuals, cts):
    """The explicit BPTT (``backward.stack_backward``) in the compute dtype; the cotangents come
    back in the dtypes of the primal inputs."""
    params, xs_or_dtype, h0, lengths, saved = residuals
    cparams, ch0 = precision.to_compute(spec.compute_dtype, (params, h0))
    ct, ct_last = cts  # ct_last: symbolic zeros arrive as zero arrays
    t_len, batch = ct.shape[:2]
    c = _block(spec, layout, t_len, batch, max(block_width(spec), ct.shape[-1]), recurrence)
    p = Plan(block=c, store=False, segment=layout[2], unroll=unroll, recurrence=recurrence, with_dxs=True)
    ds_last = tuple(a.astype(precision.accumulation(a.dtype)) for a in ct_last)
    if layout[2] is not None and spec.bidirectional:  # the top's gradient from outside (ct) in the
        # readout's place; the segments' forward pass keeps the boundary states
        cxs = precision.to_compute(spec.compute_dtype, xs_or_dtype)
        valid = forward.valid_mask(lengths, t_len)
        ds_last = _bidirectional_top(spec, ct, valid, ds_last)
        run = backward.Run(cxs, (), ch0, valid, None, None, dtop=ct)
        _, g, dh0, _, dxs, _ = segments.bidirectional_segments(cparams, spec, run, p, ds_last=ds_last)
        g_layers, g_reverse = g.layers, g.reverse_layers
    elif layout[2] is not None:  # segments: recomputed from the boundary states (``saved``), the top
        # layer's gradient from outside (ct) in the readout's place
        cxs = precision.to_compute(spec.compute_dtype, xs_or_dtype)
        run = backward.Run(cxs, (), ch0, forward.valid_mask(lengths, t_len), None, None, dtop=ct)
        init = backward.zero_carry(cparams, ch0)._replace(dh=ds_last)
        carry, _, dxs, _ = segments.stack_backward_segments(cparams, spec, run, lengths, p, init, boundaries=saved)
        g_layers, g_reverse, dh0 = carry.layers, (), carry.dh
    else:
        g_layers, g_reverse, dxs, dh0, _ = backward.stack_backward(
            cparams, spec, saved, ch0, lengths, ct, p, ds_last=ds_last
        )
    g_readout = jax.tree_util.tree_map(jnp.zeros_like, params.readout)
    grads, dxs, dh0 = precision.like((RNNParams(g_layers, g_reverse, g_readout), dxs, dh0), (params, xs_or_dtype, h0))
    return grads, dxs, dh0, None  # lengths: integer, no cotangent


def _bidirectional_top(spec: RNNSpec, ct: Array, valid: Array | None, ds_last: tuple) -> tuple:
    """``ds_last`` as ``segments.bidirectional_segments`` takes it with ``dtop = ct`` (the cotangent
    of the merged top states): at a padded step (t >= lengths[b]) the output holds the top reverse
    net's final state, where the segments hold its initial one, so that part of ct is added to the
    final state's cotangent here (the segments do not read it)."""
    if valid is None:
        return ds_last
    n1 = spec.hidden_sizes[-1]
    d_r = ct[..., n1:] if spec.merge == "concat" else ct
    top = 2 * spec.num_layers - 1  # the top reverse net's entry
    d = ds_last[top]
    moved = jnp.sum(jnp.where(~valid[..., None], d_r, 0), axis=0).astype(d.dtype)
    return ds_last[:top] + (d.at[:, :n1].add(moved),) + ds_last[top + 1 :]


_states.defvjp(_states_fwd, _states_bwd)


GRADS = ("bptt", "autodiff")


def check_grad(grad: str) -> None:
    """``grad`` must be "bptt" (the explicit BPTT) or "autodiff" (``jax.grad`` of the plain scans)."""
    if grad not in GRADS:
        raise ValueError(f"grad: expected 'bptt' or 'autodiff', got {grad!r}")


def check_memory_options(gates: str, max_memory, checkpoint_every=None):
    """A layer's ``gates``, ``max_memory`` and ``checkpoint_every`` checked at construction (a bad
    value names its option); returned as ``Options`` keeps them (a list of levels as a tuple)."""
    options = Options(gates=gates, checkpoint_every=checkpoint_every)
    if max_memory is not None:
        budget.parse_memory(max_memory)
    return gates, max_memory, options.checkpoint_every


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
    gates: str = "auto",
    block_size: int | None = None,
    checkpoint_every: int | tuple[int, ...] | None = None,
    max_memory: int | str | None = None,
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
      gates: the GRU's and LSTM's gates kept from the forward pass for the backward ("store") or
        recomputed there ("recompute"); "auto": a plan tuned on this machine for this call when the
        plan cache has one (``bptt_jax.tune_states``), else ``bptt``'s rules (as for ``block_size``
        and ``unroll``). Same gradients either way.
      block_size: C, the backward's time block (gates recomputed per block); None: as ``bptt``'s
        rules. A C that does not divide T runs the whole sequence as one block.
      checkpoint_every: k, checkpoint segments: for a unidirectional stack the forward pass keeps,
        besides its output (the top layer's states), only the state entering every k-step segment
        of each layer, and the backward pass recomputes each segment from it; a bidirectional
        stack keeps only its output and the backward pass runs ``bptt``'s bidirectional segments
        (``segments.bidirectional_segments``, the output's gradient in the readout's place). Same
        gradients (``bptt``'s ``checkpoint_every``). A k that does not divide T: the last segment is
        filled up with padding steps (states held, as past a sequence's length; k > T is T). A
        tuple (k1, k2, ...): nested segments, as ``bptt``'s (a unidirectional stack's forward pass
        keeps the k1-step boundaries, the backward pass recomputes each k1-step segment's k2-step
        boundaries, and so on; a bidirectional stack's segments nest as ``bptt``'s; a level of T
        steps or more is dropped). None: no segments.
      max_memory: a budget for the temp memory of the layer's forward + backward program, in bytes
        or as a string ("512MiB"): the first of these that fits, checked by compiling it once per
        shape (``bptt_jax.core.budget``): ``gates`` and ``block_size`` as given, then the gates
        recomputed, then smaller time blocks, then checkpoint segments (one level, then two
        nested ones; padded where they do not divide T). A plan tuned for this budget
        (``bptt_jax.tune_states``) is read from the plan cache first. Raises ValueError naming the
        smallest budget that would fit when none does.

    Returns:
      [T, B, N_top] merged top states (N_top = 2*N1 for a concat-merged bidirectional net), or
      (states, h_last) with ``return_last``. Works under jit, vmap and inside lax.scan.
    """
    limit = None if max_memory is None else budget.parse_memory(max_memory)
    asked, xs, h0, lengths, t_len = prepare(
        params, spec, xs, h0, lengths, grad, unroll, recurrence, gates, block_size, checkpoint_every
    )
    if grad == "bptt":
        unroll, rec, layout = _plan(params, spec, asked, xs, h0, lengths, limit)
        xs, lengths = _pad_for(layout[2], xs, lengths)  # segments a budget or tuned entry chose
        states, last = _states(spec, unroll, rec, layout, params, xs, h0, lengths)
        states = states[:t_len]  # without the padding steps (their states are held ones)
    else:
        rec = kernels.resolve(
            recurrence, spec.hidden_sizes, spec.compute_dtype or xs.dtype, cell=spec.cell, differentiable=True
        )
        states, last, _ = _plain(spec, forward.resolve_unroll(unroll), rec, params, xs, h0, lengths)
    return (states, spec.public_states(last)) if return_last else states


def prepare(params, spec, xs, h0, lengths, grad, unroll, recurrence, gates, block_size, checkpoint_every):
    """``rnn_states``' arguments checked (a bad value names its option) and, for segments whose
    outer level does not divide T, the inputs padded: (the ``Options`` asked, with the segment
    levels for this T; xs, h0, lengths as ``_states`` takes them; T before padding)."""
    check_grad(grad)
    asked = Options(
        unroll=unroll, block_size=block_size, checkpoint_every=checkpoint_every, recurrence=recurrence, gates=gates
    )
    asked.check(spec, False)
    xs, h0, lengths = checks.check_inputs(params, spec, xs, h0, lengths)
    t_len = xs.shape[0]
    every = _levels_within(asked.checkpoint_every, t_len)
    if grad == "bptt" and every is not None:
        k = segment_levels(every)[0]
        if t_len % k:  # the last segment is filled up with steps no sequence has
            if lengths is None:
                lengths = jnp.full((xs.shape[1],), t_len, jnp.int32)
            xs = forward.pad_time(xs, -t_len % k)
    return dataclasses.replace(asked, checkpoint_every=every), xs, h0, lengths, t_len


def _plan(
    params, spec: RNNSpec, asked: Options, xs, h0, lengths, limit: int | None, use_cache: bool = True
) -> tuple[int, str, tuple]:
    """(unroll, recurrence, layout (gates, block_size, checkpoint_every)) for ``_states``: a plan
    tuned for this call when the plan cache has one (``bptt_jax.tune_states``), else the options
    as asked (the rules resolve what they leave open), under a budget the first that fits
    (``_within_budget``)."""
    t_len, batch = xs.shape[:2]
    dtype = jnp.dtype(spec.compute_dtype or xs.dtype)
    chosen = asked
    tuned = tuned_entry(asked, spec, t_len, batch, dtype, limit, entry="rnn_states") if use_cache else None
    if tuned is not None:
        chosen = fill_tuned(asked, tuned, spec, t_len, batch, dtype)
        k = tuned.get("checkpoint_every")
        if limit is not None and asked.checkpoint_every is None and k is not None:
            chosen = dataclasses.replace(chosen, checkpoint_every=tuple(k) if isinstance(k, list) else k)
    rec = kernels.resolve(chosen.recurrence, spec.hidden_sizes, dtype, cell=spec.cell)
    unroll = forward.resolve_unroll(chosen.unroll)
    layout = (chosen.gates, chosen.block_size, chosen.checkpoint_every)
    if limit is not None and tuned is None:
        args = (params, xs, h0, lengths)
        leaves, structure = jax.tree_util.tree_flatten(args)
        signature = tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in leaves)
        layout = _within_budget(spec, unroll, rec, layout, limit, signature, structure)
    return unroll, rec, layout


def states_fwd_bwd(spec: RNNSpec, unroll: int, rec: str, layout: tuple):
    """(params, xs, h0, lengths, ct) -> the cotangents of (params, xs, h0): one forward + backward
    of ``_states`` with this plan (what a budget compiles and ``tune_states`` times)."""

    def fwd_bwd(p, x, h, n, ct):
        _, pull = jax.vjp(lambda p, x, h: _states(spec, unroll, rec, layout, p, x, h, n)[0], p, x, h)
        return pull(ct)

    return fwd_bwd


def _levels_within(every, t_len: int):
    """``checkpoint_every`` for a sequence of T steps: a level of T steps or more is no segment (the
    levels below it remain); none left, or an int above T: T."""
    if every is None:
        return None
    levels = tuple(k for k in segment_levels(every) if k < t_len)
    return levels if len(levels) > 1 else (levels[0] if levels else t_len)


@functools.lru_cache(maxsize=256)
def _within_budget(spec: RNNSpec, unroll: int, rec: str, layout: tuple, limit: int, signature: tuple, structure):
    """(gates, block_size) for ``rnn_states`` under ``max_memory=limit`` with arguments of this
    signature: ``budget.choose`` over the custom VJP's forward + backward programs, compiled from
    the shapes (checkpoint segments whose outer level does not divide T run padded: ``_pad_for``)."""
    params, xs, h0, lengths = jax.tree_util.tree_unflatten(
        structure, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in signature]
    )
    t_len, batch = xs.shape[:2]
    dtype = jnp.dtype(spec.compute_dtype or xs.dtype)
    top = jax.eval_shape(lambda p, x, h, n: _plain(spec, unroll, rec, p, x, h, n)[0], params, xs, h0, lengths)
    store = resolve_gates(layout[0], spec, t_len, batch, layout[2], dtype)
    c = _block(spec, layout, t_len, batch, max(block_width(spec), top.shape[-1]), rec)
    first = Options(block_size=c, gates="store" if store else "recompute", checkpoint_every=layout[2])

    def measure(o: Options) -> int:  # on the shapes the plan runs: padded to its outer segment level
        fwd_bwd = states_fwd_bwd(spec, unroll, rec, (o.gates, o.block_size, o.checkpoint_every))
        x, n, ct = xs, lengths, top
        pad = _padding(o.checkpoint_every, t_len)
        if pad:
            x = jax.ShapeDtypeStruct((t_len + pad,) + xs.shape[1:], xs.dtype)
            n = lengths if lengths is not None else jax.ShapeDtypeStruct((batch,), jnp.int32)
            ct = jax.ShapeDtypeStruct((t_len + pad,) + top.shape[1:], top.dtype)
        return budget.temp_bytes(jax.jit(fwd_bwd).lower(params, x, h0, n, ct).compile())

    chosen = budget.choose(first, spec, t_len, batch, dtype, limit, True, measure)
    return (chosen.gates, chosen.block_size, chosen.checkpoint_every)


def _padding(every, t_len: int) -> int:
    """The steps to append so that the outer segment level of ``every`` divides T (0: none)."""
    return -t_len % segment_levels(every)[0] if every is not None else 0


def _pad_for(every, xs: Array, lengths: Array | None) -> tuple[Array, Array | None]:
    """xs padded to a multiple of the outer segment level, and lengths (T where none were given:
    no sequence has the padded steps, which hold the state)."""
    pad = _padding(every, xs.shape[0])
    if not pad:
        return xs, lengths
    if lengths is None:
        lengths = jnp.full((xs.shape[1],), xs.shape[0], jnp.int32)
    return forward.pad_time(xs, pad), lengths
