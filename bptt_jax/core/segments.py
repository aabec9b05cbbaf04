"""``checkpoint_every=k``: the states are stored every k steps and each k-step segment is recomputed
in the backward pass (unidirectional stacks here; bidirectional ones in ``bidirectional_segments``).

The forward pass keeps only the state entering each segment of k steps (T/k boundary states per
layer); the backward pass walks the segments from the last to the first, re-runs the forward scans
inside the segment from its boundary state and runs the blocked BPTT over those k steps
(``backward.stack_backward_blocked``), carrying dh and the weight-gradient sums from segment to
segment. Stored activations grow like T/k + k instead of T, for about one extra forward pass of
compute. Inside a segment the block size is the largest divisor of k not above the plan's block
(the whole segment where the compiled kernel runs a gated cell whose segment keeps its gates:
``plan.segment_block``), and a gated cell's forward scans over the segment keep its gates where the
rules would keep them for a run of k steps (``plan.resolve_gates("auto", ...)``): the BPTT over the
segment reads them instead of recomputing them once more (benchmarks/segment_gates.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core import backward, cells, forward, precision
from bptt_jax.core.params import RNNParams, RNNSpec
from bptt_jax.core.plan import Plan, resolve_gates, segment_levels
from bptt_jax.core.precision import zeros_acc

Array = jax.Array


def _largest_divisor_at_most(n: int, c: int) -> int:
    return max(d for d in range(1, min(n, c) + 1) if n % d == 0)


def _window(a: Array | None, start, k: int) -> Array | None:
    """Steps start .. start+k-1 of ``a`` (time-major; ``start`` may be traced)."""
    return None if a is None else lax.dynamic_slice_in_dim(a, start, k, axis=0)


def _window_lengths(lengths: Array | None, start, k: int) -> Array | None:
    """[B]: each sequence's valid steps inside the k steps from ``start`` (None: all)."""
    return None if lengths is None else jnp.clip(lengths - start, 0, k).astype(jnp.int32)


def chunked_forward(
    params, spec, xs, h0, lengths, plan: Plan, chunk: int, every: int | None, *, keep_top=False, start=0, span=None
):
    """The forward scans over ``span`` steps of ``xs`` from ``start`` (None: all of them), ``chunk``
    steps at a time: one flat scan over the chunks, each reading its window of ``xs`` where it lies,
    so that at most one chunk's states, projections and inputs exist at a time (whatever the
    segments' levels above it).

    Returns (the states after the last step (L entries [B, W]), the states entering every
    ``every``-step segment (L entries [span/every, B, W]; None when ``every`` is None), the top
    layer's merged states [span, B, N_top] when ``keep_top``, else None); ``chunk`` divides
    ``every``, which divides ``span``."""
    span = xs.shape[0] if span is None else span
    n, per = span // chunk, (every or span) // chunk
    chunk_plan = plan._replace(block=_largest_divisor_at_most(chunk, plan.block), store=False)

    emit = every is not None and per == 1  # every chunk opens a segment: its entering state is an output

    def body(carry, i):
        h, kept = carry
        if kept is not None:  # the state entering segment i // per, written when chunk i opens it
            j, opens = i // per, i % per == 0
            kept = tuple(lax.dynamic_update_index_in_dim(b, jnp.where(opens, s, b[j]), j, 0) for b, s in zip(kept, h))
        o = start + i * chunk
        traces = backward.run_forward(
            params, spec, _window(xs, o, chunk), h, _window_lengths(lengths, o, chunk), chunk_plan
        )
        return (forward.last_states(traces), kept), (traces[-1].merged if keep_top else None, h if emit else None)

    kept0 = None if every is None or emit else tuple(jnp.zeros((span // every,) + s.shape, s.dtype) for s in h0)
    (h_last, kept), (top, entering) = lax.scan(body, (tuple(h0), kept0), jnp.arange(n))
    return h_last, entering if emit else kept, None if top is None else top.reshape((span,) + top.shape[2:])


def stack_backward_segments(
    params: RNNParams,
    spec: RNNSpec,
    run: backward.Run,
    lengths: Array | None,
    plan: Plan,
    carry: backward.Carry | None = None,
    boundaries: tuple[Array, ...] | None = None,
    *,
    start=0,
    span: int | None = None,
    h_start: tuple[Array, ...] | None = None,
    dxs_out: Array | None = None,
) -> tuple[backward.Carry, tuple[Array, ...] | None, Array | None, Array | None]:
    """The explicit BPTT with segments of k = ``plan.segment`` steps.

    Nested segments (``plan.segment`` a tuple (k1, k2, ...)): each k1-step segment's backward pass
    is this function again over that segment, with segments of k2 steps (its boundary states
    recomputed from the segment's own), down to the last level, whose segments run the blocked
    BPTT. Memory ~ T'/k1 + k1/k2 + ... + k_last states, for one more forward pass per level: every
    level reads its inputs, targets and dtop where they lie in ``run`` (windows of the last
    level's k steps), and its forward passes run k_last steps at a time (``chunked_forward``).
    The valid-step mask and the weights, [T', B] arrays that the caller computes (and XLA may never
    materialize whole), are sliced by each level's scan instead: ``run.valid`` and ``run.w`` hold
    this call's ``span`` steps only.

    Args:
      run: the padded inputs, targets and weights, or ``run.dtop`` (the gradient reaching the top
        layer's states from outside, the custom VJP's) instead of those; ``run.hs`` is not read
        (the states are recomputed); ``run.h0`` holds the states before step 0; T' a multiple of
        k; no output mask.
      lengths: [B] valid steps (the padded steps are not valid), or None.
      carry: what enters from beyond the last step (an outer segment's carry); None: zeros.
      boundaries: L entries [S, B, W], the state entering each segment, when the forward pass
        kept them already (the custom VJP's); None: this function's own forward pass finds them.
      start, span, h_start, dxs_out: an outer level's segment: its ``span`` steps from ``start``
        of ``run``'s inputs, targets and dtop (``run.valid`` and ``run.w``: those steps only),
        the states entering it, and the [T', B, N] dX being filled (None: the whole run from
        ``run.h0``; a new dX).

    Returns:
      (carry at step 0, the final states (L entries [B, W]; None when ``boundaries`` were given),
      dxs [T', B, N] or None, norms [span, L] or None).
    """
    k, *inner = segment_levels(plan.segment)
    span = run.xs.shape[0] if span is None else span
    h_start = run.h0 if h_start is None else h_start
    n_seg = span // k
    seg_plan = plan._replace(block=_largest_divisor_at_most(k, plan.block))
    # A gated cell keeps the gates of the segment it differentiates (k steps) where the rules would
    # keep them for a run of k steps, instead of recomputing them once more in the blocked BPTT.
    batch = run.xs.shape[1]
    last_k = inner[-1] if inner else k
    store = resolve_gates("auto", spec, last_k, batch, None, run.xs.dtype)
    diff_plan = plan._replace(block=_largest_divisor_at_most(last_k, plan.block), store=store)

    h_last = None
    if boundaries is None:  # L entries [S, B, W]
        h_last, boundaries, _ = chunked_forward(
            params, spec, run.xs, h_start, lengths, seg_plan, last_k, k, start=start, span=span
        )
    # dX: one [T', B, N] buffer filled through nested levels; one level stacks its segments' dx
    # (an output of the scan: no zeros to fill)
    fill = plan.with_dxs and (bool(inner) or dxs_out is not None)
    if fill and dxs_out is None:
        dxs_out = jnp.zeros(run.xs.shape, precision.accumulation(run.xs.dtype))

    def seg_backward(state, inp):
        carry, dxs = state
        s, h_seg, valid_seg, w_seg = inp
        o = start + s * k
        if inner:  # the next level's segments inside this one
            inner_plan = plan._replace(segment=tuple(inner))  # read through segment_levels
            sub = run._replace(valid=valid_seg, w=w_seg)
            carry, _, dxs, norms = stack_backward_segments(
                params, spec, sub, lengths, inner_plan, carry, start=o, span=k, h_start=h_seg, dxs_out=dxs
            )
            return (carry, dxs), (None, norms)
        lens = _window_lengths(lengths, o, k)
        x_seg = _window(run.xs, o, k)
        traces = backward.run_forward(params, spec, x_seg, h_seg, lens, diff_plan)
        caches = tuple(tr.caches[0] for tr in traces if tr.caches is not None) if store else None
        seg_run = backward.Run(
            x_seg,
            tuple(tr.states[0] for tr in traces),
            h_seg,
            valid_seg,
            _window(run.targets, o, k),
            w_seg,
            caches=caches,
            dtop=_window(run.dtop, o, k),
        )
        carry, dx, norms = backward.stack_backward_blocked(params, spec, seg_run, carry, diff_plan)
        if dx is not None and fill:
            dxs, dx = lax.dynamic_update_slice_in_dim(dxs, dx.astype(dxs.dtype), o, axis=0), None
        return (carry, dxs), (dx, norms)

    init = backward.zero_carry(params, run.h0) if carry is None else carry
    inputs = (jnp.arange(n_seg), boundaries, _by_segment(run.valid, n_seg), _by_segment(run.w, n_seg))
    (out, dxs_out), (dxs, norms) = lax.scan(seg_backward, (init, dxs_out), inputs, reverse=True)
    return out, h_last, dxs_out if fill else _joined(dxs), _joined(norms)


def _by_segment(a: Array | None, n_seg: int) -> Array | None:
    """[n_seg * k, ...] -> [n_seg, k, ...]: a per-step array as a scan over segments reads it."""
    return None if a is None else a.reshape((n_seg, a.shape[0] // n_seg) + a.shape[1:])


def _joined(a: Array | None) -> Array | None:
    """[n_seg, k, ...] -> [n_seg * k, ...]: what a scan over segments stacked, back in steps."""
    return None if a is None else a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def _flip(a: Array | None) -> Array | None:
    return None if a is None else a[::-1]


def bidirectional_segments(
    params: RNNParams, spec: RNNSpec, run: backward.Run, plan: Plan, ds_last: tuple[Array, ...] | None = None
):
    """The explicit BPTT of a bidirectional stack with segments of k = ``plan.segment`` steps.

    The reverse net here runs over input time from the last step to the first, holding its state
    at the padded steps t >= lengths[b] (so it enters each sequence's last valid step with h(-1)):
    the same states at every valid step as the scan over ``reverse_padded`` inputs, and every
    segment of input time is a segment of its scan too (the flipped segment). Per layer l and
    segment s two boundary states are kept: the forward net's entering from the left
    (``fwd[l][s]``) and the reverse net's entering from the right (``rev[l][s]``); a segment's
    states are recomputed from them, its input from the layers below recomputed the same way. The
    forward pass runs every net but the top layer's reverse net, which runs (and leaves its
    boundaries) in the first backward sweep: that sweep walks the segments from right to left too.

    The backward pass walks the layers from the top down and runs two sweeps per layer: the forward
    net's BPTT over the segments from the last to the first (its carry dh moves towards t = 0) and
    the reverse net's from the first to the last (its carry moves towards t = T'-1). Both need
    dDIV/d(the layer's merged states) in the segment at hand: the readout's gradient at the top,
    handed down through the layers above, each of whose two sweeps kept its carry entering every
    segment (``bf``, ``br``). So no [T', B, ...] array but the inputs (and dxs when asked for) lives
    across the sequence: memory ~ T'/k + k per layer. The cost: for one layer, the forward net runs
    three times, the reverse net twice and the readout twice, against once each without segments
    (docs/results/benchmarks.md, "Bidirectional segments", has the time it costs); each
    layer below the top adds two sweeps that recompute the stack and the backward passes above it.
    A gated cell keeps the gates of the segment it differentiates (k steps) instead of recomputing
    them per block.

    Nested segments (``plan.segment`` a tuple (k1, k2, ...)): a sweep's work on one k1-step
    segment is this same computation over that segment alone, with segments of k2 steps: a k1-step
    segment is a bidirectional problem of its own, whose nets start from their boundary states
    (the forward nets' from the left, the reverse nets' from the right) and whose sweeps start from
    the carries that enter it (the forward nets' from the right, the reverse nets' from the left:
    the outer sweep's own, and those the sweeps above kept). Inside it run the sweep at hand and the
    sweeps above it, whose carries it needs at every k2-step boundary. Memory ~ T'/k1 + k1/k2 +
    ... + k_last per layer, for more recomputation per level.

    Args:
      run: the padded inputs, targets and weights (``run.hs`` is not read; ``run.h0``: L*2 entries);
        T' a multiple of k; no output mask. Or, instead of targets, ``run.dtop`` [T', B, N_top]: the
        gradient reaching the top layer's merged states from outside (the custom VJP of
        ``rnn_states``), in the readout's place (DIV 0, a zero readout gradient). Its reverse part at
        a padded step (t >= lengths[b]) is not read: there the output holds the reverse net's final
        state, where this function holds its initial one (the caller adds that part to ``ds_last``).
      ds_last: L*2 entries, the gradient reaching each net's final state (the custom VJP's), entering
        its sweep as the first carry; None: zeros.

    Returns:
      (DIV, grads, dh0 (L*2), h_last (L*2), dxs [T', B, N] or None, norms [T', L*2(, 2)] or None),
      in the same form and layout as ``gradient._bidirectional``.
    """
    dx0 = jnp.zeros(run.xs.shape, precision.accumulation(run.xs.dtype)) if plan.with_dxs else None
    div, g, dh0, h_last, dxs, norms = _bidirectional_sweeps(params, spec, run, plan, ds_last, None, dx0)
    dh_norms = jnp.stack(norms, axis=1) if plan.with_norms else None
    assert div is not None  # the top layer's forward sweep summed it
    grads = RNNParams(tuple(g[0]), tuple(g[1]), g[2])
    return div, grads, tuple(dh0), tuple(h_last), dxs, dh_norms


def _bidirectional_sweeps(
    params: RNNParams,
    spec: RNNSpec,
    run: backward.Run,
    plan: Plan,
    ds_last: tuple[Array, ...] | None,
    only: tuple[int, int] | None,
    dxs: Array | None,
    start=0,
    span: int | None = None,
):
    """``bidirectional_segments``' work: (DIV or None, [forward nets' grads, reverse nets' grads,
    readout grads], dh0, h_last, dxs, norms), lists with one entry per layer or net (L*2).

    ``only`` = (l, j): the sweeps of net j of layer l and of both nets of every layer above it (an
    outer level's segment: nested segments); the other nets' entries are None, and DIV and the
    readout's gradient too unless the top layer's forward sweep is among them. None: every sweep.
    ``start``, ``span``: the steps of ``run``'s arrays this call covers (an outer level's segment;
    ``run.h0``: the states entering it); every segment reads its window of the inputs, targets and
    dtop where it lies; ``run.valid`` and ``run.w`` hold the ``span`` steps only (sliced by the
    level above, as ``stack_backward_segments`` says why). ``dxs``: the [T', B, N] dX that the
    sweeps computing it add into (None: not asked for), returned filled."""
    k, *inner = segment_levels(plan.segment)
    inner_plan = plan._replace(segment=tuple(inner) if len(inner) > 1 else inner[0]) if inner else None
    span = run.xs.shape[0] if span is None else span
    n_layers, n_seg = spec.num_layers, span // k
    lowest = 0 if only is None else only[0]
    sweeps = lambda l: (0, 1) if only is None or l > lowest else (only[1],)  # noqa: E731
    runs_top = 0 in sweeps(n_layers - 1)  # the top forward sweep: it also runs the top reverse net
    seg_plan = plan._replace(block=_largest_divisor_at_most(k, plan.block))
    nets = (params.layers, params.reverse_layers)
    hidden = cells.get(spec.cell).hidden
    # A gated cell keeps the gates of the segment it differentiates (k steps; 16-bit compute
    # recomputes them, as plan.resolve_gates says why).
    store = cells.get(spec.cell).CACHE > 0 and not precision.is_half(run.xs.dtype)

    def scan_time(a, j):  # a segment in input time -> its net's scan time (and back: its own inverse)
        return a if j == 0 else _flip(a)

    def states(l, j, x, h_in, valid, store=False, block=seg_plan.block):  # layer l's net j over one segment,
        return forward.unroll_layer(  # in its scan time; with the state after its last step
            nets[j][l],
            spec.activation,
            scan_time(x, j),
            h_in,
            scan_time(valid, j),
            unroll=plan.unroll,
            block_size=block,
            recurrence=plan.recurrence,
            store=store,
            with_final=True,
        )

    def stack_on(x, valid, fwd, rev, upto, keep=lambda l, j: False, block=seg_plan.block):
        """Layers < upto on one segment: ([(input, (hs_f, hs_r), (gates_f, gates_r), (final_f,
        final_r))], top merged); a net's gates are None unless ``keep(l, j)``; final: the state after
        its scan's last step."""
        out = []
        for l in range(upto):
            both = [states(l, j, x, (fwd, rev)[j][l], valid, keep(l, j), block) for j in (0, 1)]
            finals = tuple(a[1] for a in both)
            hs = tuple(a[0][0] if keep(l, j) else a[0] for j, a in enumerate(both))
            kept = tuple(a[0][1] if keep(l, j) else None for j, a in enumerate(both))
            out.append((x, hs, kept, finals))
            x = forward.merge(spec, hidden(hs[0]), hidden(_flip(hs[1])))
        return out, x

    def final_state(l, j, o, n_steps, valid, fb, rb, levels):
        """Net j of layer l after the ``n_steps`` steps from step ``o`` (its scan's last step: the
        right end for the forward net, the left end for the reverse net), from ``fb`` / ``rb`` (the
        forward / reverse nets' states entering them, layers <= l), with at most ``levels[-1]`` steps
        of states (and inputs) at a time (no levels: all of them): chunk by chunk, the layers below
        from their own chunk boundaries. ``valid``: the mask of these steps, or None."""
        if not levels:
            block = _largest_divisor_at_most(n_steps, plan.block)
            x = _window(run.xs, o, n_steps)
            x_l = stack_on(x, valid, fb, rb, l, block=block)[1]
            return states(l, j, x_l, (fb, rb)[j][l], valid, block=block)[1]
        k, n = levels[0], n_steps // levels[0]
        chunks = None if valid is None else valid.reshape((n, k) + valid.shape[1:])
        f_in: list[Array] = []  # per layer below: [n, B, W] its nets' states entering each chunk
        r_in: list[Array] = []
        for m in range(l + 1):
            below = (jnp.arange(n), chunks, tuple(f_in), tuple(r_in))
            for i in (0, 1) if m < l else (j,):

                def body(h, inp, m=m, i=i):
                    c, v_c, fb_c, rb_c = inp
                    return final_state(m, i, o + c * k, k, v_c, fb_c + (h,), rb_c + (h,), levels[1:]), h

                h_end, entering = lax.scan(body, (fb, rb)[i][m], below, reverse=(i == 1))
                if m == l:
                    return h_end
                (f_in if i == 0 else r_in).append(entering)
        raise AssertionError("unreachable: the loop returns at layer l")

    fwd: list[Array] = []  # per layer: [S, B, W] the forward net's state entering each segment
    rev: list[Array] = []  # per layer: [S, B, W] the reverse net's state entering each segment from the right
    h_last: list[Array] = []
    for l in range(n_layers):  # a loop over layers, not time

        def f_body(h, inp, l=l):
            s, valid, fb, rb = inp
            return final_state(l, 0, start + s * k, k, valid, fb + (h,), rb + (h,), tuple(inner)), h

        def r_body(h, inp, l=l):
            s, valid, fb, rb = inp
            return final_state(l, 1, start + s * k, k, valid, fb + (h,), rb + (h,), tuple(inner)), h

        below = (jnp.arange(n_seg), _by_segment(run.valid, n_seg), tuple(fwd), tuple(rev))
        hf_last, fb_l = lax.scan(f_body, run.h0[2 * l], below)
        fwd.append(fb_l)
        h_last.append(hf_last)
        if l < n_layers - 1 or not runs_top:  # else the top reverse net runs in the first backward sweep
            hr_last, rb_l = lax.scan(r_body, run.h0[2 * l + 1], below, reverse=True)
            rev.append(rb_l)
            h_last.append(hr_last)

    def parts(l, d_merged, valid):  # dDIV/d(layer l's merged states) -> each net's part
        n1 = spec.hidden_sizes[l]
        d_f, d_r = (d_merged[..., :n1], d_merged[..., n1:]) if spec.merge == "concat" else (d_merged, d_merged)
        if run.dtop is not None and l == n_layers - 1 and valid is not None:  # dtop's padded steps: not read
            d_r = jnp.where(valid[..., None], d_r, 0)
        return d_f, d_r

    def net_backward(l, j, seg_l, above, valid, h_in, carry, want_dx):  # one net's BPTT over one segment
        x, hs, kept, _ = seg_l
        grads, carry, dx, norm = backward.layer_backward_blocked(
            nets[j][l],
            spec.activation,
            scan_time(x, j),
            hs[j],
            h_in,
            scan_time(parts(l, above, valid)[j], j),
            scan_time(valid, j),
            seg_plan,
            want_dx=want_dx,
            ds_last=carry,
            cache=kept[j],
        )
        if norm is not None and valid is not None:  # the padded steps' ||dh(t)|| is 0, as without segments
            v = scan_time(valid, j)
            norm = jnp.where(v.reshape(v.shape + (1,) * (norm.ndim - 2)), norm, 0)
        return grads, carry, scan_time(dx, j), None if norm is None else scan_time(jnp.mean(norm, axis=1), j)

    def gradient_at(l, j, x, valid, tg, w, dtop, fb, rb, bf, br):
        """One segment: the stack recomputed, the readout's DIV, grads and dDIV/d(top merged) (or the
        given ``dtop``), that handed down to layer l (the nets above run from their carries kept at
        this segment)."""
        keep = lambda m, i: store and (m > l or (m, i) == (l, j))  # the nets differentiated here
        seg_layers, top = stack_on(x, valid, fb, rb, n_layers, keep)
        if dtop is None:
            div, g_readout, above = backward.readout_backward(params, spec, top, tg, w, generic=plan.generic)
        else:  # the gradient from outside: no readout
            div, g_readout, above = zeros_acc(params.readout.b2[0]), zeros(params.readout), dtop
        for m in reversed(range(l + 1, n_layers)):
            dx_f = net_backward(m, 0, seg_layers[m], above, valid, fb[m], bf[m], True)[2]
            dx_r = net_backward(m, 1, seg_layers[m], above, valid, rb[m], br[m], True)[2]
            above = dx_f + dx_r
        return seg_layers, div, g_readout, above

    def segment_backward(l, j, top, want_dx, ds, o, valid, w, fb, rb, bf_above, br_above, dxs):
        """Net j of layer l over the segment from step ``o``, from the carry ``ds`` entering it:
        (grads, the carry leaving it, ``dxs`` with its dx added, ||dh||, DIV and the readout's
        gradient (top sweep), the top reverse net's state at the segment's left (top sweep))."""
        if inner_plan is not None:  # the next level's segments inside this one
            h0_seg = tuple(h for m in range(n_layers) for h in (fb[m], rb[m]))
            ds_seg = [zeros_acc(h) for h in h0_seg]  # the nets below and beside are not swept
            ds_seg[2 * l + j] = ds
            for i, m in enumerate(range(l + 1, n_layers)):
                ds_seg[2 * m], ds_seg[2 * m + 1] = bf_above[i], br_above[i]
            div_s, g_s, dh0_s, h_last_s, dxs, norms_s = _bidirectional_sweeps(
                params, spec, run._replace(h0=h0_seg, valid=valid, w=w), inner_plan, tuple(ds_seg), (l, j), dxs, o, k
            )
            h_left = h_last_s[2 * n_layers - 1] if top else None
            return g_s[j][l], dh0_s[2 * l + j], dxs, norms_s[2 * l + j], div_s, g_s[2], h_left
        x, tg, dtop = (_window(a, o, k) for a in (run.xs, run.targets, run.dtop))
        pad = (None,) * (l + 1)
        seg_layers, div_s, g_ro_s, above = gradient_at(
            l, j, x, valid, tg, w, dtop, fb, rb, pad + bf_above, pad + br_above
        )
        h_in = (fb if j == 0 else rb)[l]
        g_s, ds_new, dx, norm = net_backward(l, j, seg_layers[l], above, valid, h_in, ds, want_dx)
        if dx is not None:  # both sweeps add into one dX
            dxs = lax.dynamic_update_slice_in_dim(dxs, _window(dxs, o, k) + dx.astype(dxs.dtype), o, axis=0)
        h_left = seg_layers[l][3][1] if top else None  # its last scan step: the state entering segment s-1
        return g_s, ds_new, dxs, norm, div_s, g_ro_s, h_left

    zeros = lambda t: jax.tree_util.tree_map(zeros_acc, t)
    bf: dict[int, Array] = {}  # per layer above: [S, B, W] the forward net's carry entering each segment (right)
    br: dict[int, Array] = {}  # the reverse net's carry entering each segment (left)
    g: list[Any] = [[None] * n_layers, [None] * n_layers, None]
    dh0: list[Any] = [None] * (2 * n_layers)
    norms: list[Any] = [None] * (2 * n_layers)
    div = None
    for l in reversed(range(lowest, n_layers)):
        kept = tuple(bf[m] for m in range(l + 1, n_layers)), tuple(br[m] for m in range(l + 1, n_layers))
        want_dx = l == 0 and plan.with_dxs
        for j in sweeps(l):
            top = l == n_layers - 1 and j == 0  # the sweep that sums DIV and the readout's gradient

            def body(carry, inp, l=l, j=j, top=top, want_dx=want_dx):
                ds, g_net, div_c, g_ro, h_rt, dx_sum = carry
                s, valid, w, fb, rb, bf_above, br_above = inp
                if top:  # the top reverse net's state entering this segment from the right
                    rb = rb + (h_rt,)
                g_s, ds_new, dx_sum, norm, div_s, g_ro_s, h_left = segment_backward(
                    l, j, top, want_dx, ds, start + s * k, valid, w, fb, rb, bf_above, br_above, dx_sum
                )
                g_net = backward._tree_add(g_net, g_s)
                h_rt_in = h_rt
                if top:
                    div_c, g_ro = div_c + div_s, backward._tree_add(g_ro, g_ro_s)
                    h_rt = h_left
                return (ds_new, g_net, div_c, g_ro, h_rt, dx_sum), (ds, norm, h_rt_in)

            init = (
                zeros_acc(run.h0[2 * l + j]) if ds_last is None else ds_last[2 * l + j],
                zeros(nets[j][l]),
                zeros_acc(params.readout.b2[0]),
                zeros(params.readout),
                run.h0[2 * l + 1] if top else None,
                dxs if want_dx else None,
            )
            inputs = (
                jnp.arange(n_seg),
                _by_segment(run.valid, n_seg),
                _by_segment(run.w, n_seg),
                tuple(fwd),
                tuple(rev),
            )
            (ds, g_net, div_c, g_ro, h_rt, dx_out), (entering, norm, rt) = lax.scan(
                body, init, inputs + kept, reverse=(j == 0)
            )
            g[j][l], dh0[2 * l + j] = g_net, ds
            if want_dx:
                dxs = dx_out
            (bf if j == 0 else br)[l] = entering
            if top:
                div, g[2] = div_c, g_ro
                assert h_rt is not None  # the top sweep carries the top reverse net's state
                rev.append(rt)
                h_last.append(h_rt)
            norms[2 * l + j] = _joined(norm)
    return div, g, dh0, h_last, dxs, norms
