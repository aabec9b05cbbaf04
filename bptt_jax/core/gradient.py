"""The public entry points of the explicit BPTT: ``bptt`` (DIV and its gradient), ``loss`` and
``loss_and_state`` (the plain forward computation that ``jax.grad`` differentiates: the oracle).

How the gradient is computed lives in the modules below: ``plan`` (the options and the rules that
resolve them), ``backward`` (the reverse scans over time blocks, in the notes' notation),
``segments`` (checkpoint segments). Inputs are checked once on the host (``checks.entry_checks``)
and once when the call is traced (``checks.traced_checks``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bptt_jax.core import backward, budget, checks, forward, kernels, losses, plan, precision, segments
from bptt_jax.core.params import RNNParams, RNNSpec

Array = jax.Array


class BPTTAux(NamedTuple):
    """Diagnostics of one BPTT pass. Per-(layer, direction) entries are ordered layer * D + direction.

    Attributes:
      dh0: L*D entries [B, N1]: dDIV/dh(-1); the LSTM's are (dDIV/dh(-1), dDIV/dc(-1)) pairs.
      dxs: [T, B, N] dDIV/dX, only with ``with_dxs=True`` (else None).
      dh_norms: [T, L*D] ||dDIV/dh(t)|| averaged over the batch, in input time, only with
        ``diagnostics=True`` (else None).
      h_last: L*D entries [B, N1] ((h, c) pairs for the LSTM): the forward pass's final states.
      dc_norms: the LSTM with ``diagnostics=True``: [T, L*D] ||dDIV/dc(t)||, as dh_norms (else None).
    """

    dh0: tuple
    dxs: Array | None
    dh_norms: Array | None
    h_last: tuple
    dc_norms: Array | None = None


@functools.partial(jax.jit, static_argnames=("spec", "unroll", "recurrence"))
def _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll, recurrence="auto"):
    """(DIV, final states): the plain forward computation that ``jax.grad`` differentiates."""
    a = checks.traced_checks(params, spec, xs, targets, weights, lengths, h0, output_mask)
    outer = a.xs.dtype
    params, xs, h0 = precision.to_compute(spec.compute_dtype, (params, a.xs, a.h0))
    rec = kernels.resolve(recurrence, spec.hidden_sizes, xs.dtype, cell=spec.cell, differentiable=True)
    unroll = forward.resolve_unroll(unroll)
    traces = forward.run_stack(params, spec, xs, h0, a.lengths, unroll=unroll, recurrence=rec)
    top = traces[-1].merged
    if a.output_mask is not None:
        top = top * a.output_mask
    z2s, ys = backward.readout(params, spec, top)
    t_len, batch = xs.shape[0], xs.shape[1]
    w = losses.effective_weights(a.weights, a.lengths, t_len, batch, precision.accumulation(xs.dtype))
    h_last = spec.public_states(tuple(s.astype(outer) for s in forward.last_states(traces)))
    div = losses.total(losses.divergence(spec.divergence, z2s, ys, a.targets), w).astype(outer)
    return checks.poison(a.bad, (div, h_last))


def _unidirectional(params, spec, run: backward.Run, lengths, p: plan.Plan):
    """(DIV, grads, dh0, h_last, dxs, norms) of a unidirectional stack: segments or blocks."""
    if p.segment is not None:
        carry, h_last, dxs, norms = segments.stack_backward_segments(params, spec, run, lengths, p)
    else:
        traces = backward.run_forward(params, spec, run.xs, run.h0, lengths, p)
        h_last = forward.last_states(traces)  # one direction: one per layer
        run = run._replace(
            hs=tuple(tr.states[0] for tr in traces),
            caches=tuple(tr.caches[0] for tr in traces if tr.caches is not None) if p.store else None,
        )
        zero = backward.zero_carry(params, run.h0)
        carry, dxs, norms = backward.stack_backward_blocked(params, spec, run, zero, p)
    return carry.div, RNNParams(carry.layers, (), carry.readout), carry.dh, h_last, dxs, norms


def _bidirectional(params, spec, run: backward.Run, lengths, p: plan.Plan):
    """(DIV, grads, dh0, h_last, dxs, norms) of a bidirectional network: segments, or the
    whole-sequence readout."""
    if p.segment is not None:
        return segments.bidirectional_segments(params, spec, run, p)
    traces = backward.run_forward(params, spec, run.xs, run.h0, lengths, p)
    h_last = forward.last_states(traces)
    top = traces[-1].merged  # [T', B, N_top], whole sequence: both directions at each t
    mask = run.output_mask
    if mask is not None:
        top = top * mask
    assert run.targets is not None and run.w is not None  # bptt's run: a readout, no dtop
    div, g_readout, dtop = backward.readout_backward(params, spec, top, run.targets, run.w, generic=p.generic)
    if mask is not None:
        dtop = dtop * mask
    g_layers, g_reverse, dxs, dh0, norms = backward.stack_backward(params, spec, traces, run.h0, lengths, dtop, p)
    return div, RNNParams(g_layers, g_reverse, g_readout), dh0, h_last, dxs, norms


def _bptt(params, xs, targets, weights, lengths, h0, output_mask, *, spec: RNNSpec, options: plan.Options):
    """``bptt``'s jitted body: checks (once per input signature), the compute dtype, the plan, the
    time axis padded to a multiple of the block (or segment) with steps that hold the state and
    weigh 0, the BPTT; gradients come back in the dtype of what they differentiate."""
    a = checks.traced_checks(params, spec, xs, targets, weights, lengths, h0, output_mask)
    outer_params = params
    params, h0 = precision.to_compute(spec.compute_dtype, (params, a.h0))
    cdtype = jnp.dtype(spec.compute_dtype or a.xs.dtype)  # the compute dtype
    t_len, batch, _ = a.xs.shape
    p = plan.resolve(options, spec, t_len, batch, cdtype)
    # X(t) in c: the blocked unidirectional path rounds it block by block (precision.rounded), the
    # others here at the entry.
    blocked = precision.is_half(cdtype) and not spec.bidirectional and p.segment is None
    xs = a.xs if blocked else precision.to_compute(spec.compute_dtype, a.xs)
    pad = plan.padded_length(p, t_len) - t_len
    w = losses.effective_weights(a.weights, a.lengths, t_len, batch, precision.accumulation(cdtype))  # [T, B]
    lengths = a.lengths
    if pad and lengths is None:
        lengths = jnp.full((batch,), t_len, jnp.int32)  # the padded steps hold the state, weigh 0
    run = backward.Run(
        xs=forward.pad_time(xs, pad),
        hs=(),
        h0=h0,
        valid=forward.valid_mask(lengths, t_len + pad),
        targets=forward.pad_time(a.targets, pad),
        w=forward.pad_time(w, pad),
        output_mask=forward.pad_time(a.output_mask, pad),
    )
    path = _bidirectional if spec.bidirectional else _unidirectional
    div, grads, dh0, h_last, dxs, norms = path(params, spec, run, lengths, p)
    if pad:
        dxs = None if dxs is None else dxs[:t_len]
        norms = None if norms is None else norms[:t_len]
    outer = a.xs.dtype
    grads, dh0, h_last = precision.like((grads, dh0, h_last), (outer_params, a.h0, a.h0))
    div, dxs = div.astype(outer), None if dxs is None else dxs.astype(outer)
    div, grads = checks.poison(a.bad, (div, grads))
    dc_norms = None
    if norms is not None and norms.ndim == 3:  # the LSTM's cells give (||dh(t)||, ||dc(t)||) per step
        norms, dc_norms = norms[..., 0], norms[..., 1]
    aux = BPTTAux(spec.public_states(dh0), dxs if p.with_dxs else None, norms, spec.public_states(h_last), dc_norms)
    return div, grads, aux


def loss(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    targets: Array,
    *,
    weights: Array | None = None,
    lengths: Array | None = None,
    h0: tuple[Array, ...] | None = None,
    output_mask: Array | None = None,
    unroll: int | None = None,
    recurrence: str = "auto",
    check_values: bool | None = None,
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
      unroll: scan steps per loop iteration (``lax.scan``'s unroll); None picks 1 on a CPU and
        ``forward.GPU_UNROLL`` (8) on a GPU, as measured (docs/results/benchmarks.md).
      recurrence: "scan" (``lax.scan``), "pallas" (the fused kernels of ``bptt_jax.core.kernels``, one launch
        per layer and direction for all T; interpret mode on a CPU) or "auto" (the kernels on a GPU
        where they apply, the scans elsewhere: ``loss`` is differentiated by jax). An explicit
        "pallas" that cannot apply raises.
        "native" (the cells' loops as a compiled CPU kernel, ``bptt_jax.core.native``) serves
        ``bptt``'s explicit BPTT; ``loss`` and ``forward`` run the scans with it (jax cannot
        differentiate the kernel), so that ``jax.grad`` of them still works.
      check_values: how class indices and lengths are range-checked (``bptt_jax.core.checks``): None reads
        host arrays only, True also reads device arrays back (a host sync), False never; out-of-range
        values always make the result NaN in the graph.
      check_finite: raise ValueError on NaN or inf in xs, h0 or params.

    Returns:
      The scalar DIV.
    """
    lengths, weights = checks.entry_checks(
        spec, xs, targets, weights, lengths, h0, params, check_values=check_values, check_finite=check_finite
    )
    return _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll, recurrence)[0]


def loss_and_state(
    params,
    spec,
    xs,
    targets,
    *,
    weights=None,
    lengths=None,
    h0=None,
    output_mask=None,
    unroll: int | None = None,
    recurrence: str = "auto",
):
    """(DIV, final states) — ``loss`` plus the L*D final states, for ``jax.value_and_grad(...,
    has_aux=True)`` in truncated BPTT (one forward pass gives both). Arguments as ``loss``."""
    lengths, weights = checks.host_checks(spec, xs, targets, weights, lengths, None)
    return _loss(params, spec, xs, targets, weights, lengths, h0, output_mask, unroll, recurrence)


def bptt(
    params: RNNParams,
    spec: RNNSpec,
    xs: Array,
    targets: Array,
    *,
    weights: Array | None = None,
    lengths: Array | None = None,
    h0: tuple[Array, ...] | None = None,
    output_mask: Array | None = None,
    generic: bool = False,
    unroll: int | None = None,
    block_size: int | None = None,
    checkpoint_every: int | None = None,
    diagnostics: bool = False,
    with_dxs: bool = False,
    recurrence: str = "auto",
    gates: str = "auto",
    max_memory: int | str | None = None,
    check_values: bool | None = None,
    check_finite: bool = False,
) -> tuple[Array, RNNParams, BPTTAux]:
    """DIV and its gradient by the explicit BPTT over time blocks (arguments as ``loss``).

    The forward scans store h(t) only; the backward pass walks blocks of C steps from the last to
    the first (``bptt_jax.core.backward``), carrying dh and the weight-gradient sums. The call is jitted:
    shape checks run once per input signature, value checks follow ``check_values``.

    Args:
      generic: form dDIV/dZ2 by the generic path (dDIV/dY times the full Jacobian for softmax)
        instead of the fused closed form; the two agree (tests show it).
      block_size: C, steps per time block; None picks ``plan.auto_block_size`` (one block for small
        problems, cache-sized blocks for large ones). C = T is the whole-sequence computation. Any
        C >= 1 gives the same gradients.
      checkpoint_every: store the states only every k steps and recompute each k-step segment in
        the backward pass: memory ~ T/k + k instead of T, same gradients. Bidirectional networks
        too (``segments.bidirectional_segments``: more recomputation); not with output_mask. A
        tuple (k1, k2, ...), each dividing the one before, nests them (bidirectional networks
        too): memory ~ T/k1 + k1/k2 + ... + k_last, more recomputation per level.
      diagnostics: also compute ``aux.dh_norms`` = ||dDIV/dh(t)|| per step and layer (None otherwise).
        Off by default: the norm in every step of the reverse scans costs ~10% at small shapes.
      with_dxs: also compute ``aux.dxs`` = dDIV/dX [T, B, N] (one more matmul per step; None
        otherwise). ``aux.dh0`` and ``aux.h_last`` are always returned.
      recurrence: as ``loss``; with the Pallas kernels and no block_size the whole sequence is one
        block. "native": the layer's forward step loop and reverse recursion run as a compiled CPU
        kernel (``bptt_jax.core.native``; float32), one call per block. "auto" runs it for the
        GRU and the LSTM in float32 on the CPU where it can be built (``kernels.NATIVE_AUTO_CELLS``),
        with the whole sequence as one block up to ``plan.NATIVE_WHOLE_ELEMENTS``, and for the
        Elman cell where every N1 <= ``kernels.NATIVE_ELMAN_MAX_HIDDEN`` (``plan.elman_kernel_block``;
        wider, the scans; ``bptt_jax.tune`` times the kernel and the scans and keeps the faster).
      gates: GRU and LSTM: "store" keeps the gate activations of the forward pass (4 N1 floats per
        step, example, layer and direction) for the backward pass; "recompute" keeps h(t) (and c(t))
        only and recomputes the gates per block with two block matmuls; "auto" stores while that
        cache holds at most ``plan.STORE_ELEMENTS`` elements and, for the GRU, at least 2^16
        (``plan.resolve_gates``). Same gradients either way. Not with checkpoint_every (its segments
        recompute); the Elman cell has nothing to store. Measured on a 2-core CPU at the larger
        benchmark shapes (benchmarks/gated_memory.py): temp memory 0.48-0.71x of ``jax.grad``
        through a plain scan stored, 0.14-0.50x recomputed, 0.16-0.34x recomputed with half the
        automatic ``block_size``, at 0.79-1.00x of the stored default's speed.
      max_memory: a budget for the gradient program's temp memory, in bytes or as a string
        ("512MiB", "1.5GiB", "800MB"): the fastest plan whose compiled program fits is run
        (``bptt_jax.core.budget``: the rules' or tuned plan, then gates recomputed, smaller blocks,
        checkpoint segments), chosen once per shape by compiling and reading XLA's memory
        analysis; a choice given here (``block_size``, ``gates``, ``checkpoint_every``) is kept
        where it fits. Raises ValueError naming the smallest budget that would fit when none does.
        None: no budget.

    Returns:
      (DIV, grads with exactly the structure of params, ``BPTTAux(dh0, dxs, dh_norms, h_last, dc_norms)``).
    """
    lengths, weights = checks.entry_checks(
        spec, xs, targets, weights, lengths, h0, params, check_values=check_values, check_finite=check_finite
    )
    if isinstance(checkpoint_every, list):  # nested levels as a list (as JSON keeps them): the tuple
        checkpoint_every = tuple(checkpoint_every)
    options = (generic, unroll, block_size, checkpoint_every, diagnostics, with_dxs, recurrence, gates)
    args = (params, xs, targets, weights, lengths, h0, output_mask)
    try:
        fn = _compiled(spec, output_mask is not None, *options)  # checks the options once per setting
    except TypeError:  # an unhashable option value: Options names it
        plan.Options(*options)
        raise
    if max_memory is not None:
        limit = budget.parse_memory(max_memory)
        signature = tuple(
            (tuple(a.shape), str(a.dtype)) if a is not None else None
            for a in jax.tree_util.tree_leaves(args, is_leaf=lambda a: a is None)
        )
        structure = jax.tree_util.tree_structure(args, is_leaf=lambda a: a is None)
        chosen = _within_budget(spec, options, limit, signature, structure)
        fn = _compiled(spec, output_mask is not None, *dataclasses.astuple(chosen))
    return fn(*args)


@functools.lru_cache(maxsize=256)
def _within_budget(spec: RNNSpec, options: tuple, limit: int, signature: tuple, structure) -> plan.Options:
    """The plan ``bptt`` runs under ``max_memory=limit`` for arguments of this signature (shapes and
    dtypes of ``(params, xs, targets, weights, lengths, h0, output_mask)``'s leaves): a tuned entry
    for this budget when the plan cache has one, else ``budget.choose`` (compiles candidates)."""
    structs = [None if s is None else jax.ShapeDtypeStruct(s[0], s[1]) for s in signature]
    args = jax.tree_util.tree_unflatten(structure, structs)
    params, xs = args[0], args[1]
    with_mask = args[6] is not None
    asked = plan.Options(*options)
    t_len, batch = xs.shape[0], xs.shape[1]
    layers = jax.tree_util.tree_leaves((params.layers, params.reverse_layers))
    dtype = jnp.dtype(spec.compute_dtype or jnp.result_type(xs.dtype, *(a.dtype for a in layers)))
    tuned = plan.tuned_entry(asked, spec, t_len, batch, dtype, budget=limit)
    if tuned is not None:
        fill = {f: tuned[f] for f in plan.TUNABLE if plan._left_auto(asked, f)}
        if asked.checkpoint_every is None:
            fill["checkpoint_every"] = tuned.get("checkpoint_every")
        return dataclasses.replace(asked, **fill)
    first = plan.explicit(asked, spec, t_len, batch, dtype)

    def measure(o: plan.Options) -> int:
        return budget.temp_bytes(_compiled(spec, with_mask, *dataclasses.astuple(o)).lower(*args).compile())

    segments_ok = not with_mask
    return budget.choose(first, spec, t_len, batch, dtype, limit, segments_ok, measure)


@functools.lru_cache(maxsize=256)
def _compiled(spec: RNNSpec, with_output_mask: bool, *options):
    """``_bptt`` jitted for one network and ``plan.Options(*options)``, checked here (a bad value
    raises and is not cached), called with array arguments only: the jit's fast C++ dispatch then
    skips hashing keyword statics on every call (measured ~10 us a call)."""
    opts = plan.Options(*options)
    opts.check(spec, with_output_mask)
    return jax.jit(functools.partial(_bptt, spec=spec, options=opts))
