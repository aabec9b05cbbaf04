"""``tune``: measure the plans of one ``bptt`` call on this machine and cache the fastest.

    plan = bptt_jax.tune(params, spec, xs, targets, lengths=lengths)   # about a minute at most
    div, grads, aux = bptt_jax.bptt(params, spec, xs, targets, lengths=lengths)   # runs it

The rules of ``plan.resolve`` were measured on one machine; on another (other caches, vector width,
core count) other plans can be faster. ``tune`` compiles the candidate plans for the shapes at hand
-- time blocks C from the whole sequence down to a few cache-sized ones, a gated cell's gates stored
or recomputed, then the scan's unroll for the best of those -- times them side by side (interleaved
rounds, medians) within a time budget, and records the fastest in the plan cache
(``bptt_jax.core.plancache``), which every later ``bptt`` call of the same problem reads when it is
traced. Every plan gives the same gradient to rounding, so tuning changes the time, never the value.
A plan replaces the rules' plan only when it wins a head-to-head of twice the rounds after the search
(``wins_head_to_head``: at least ``MARGIN`` faster by the median of the rounds' paired time ratios,
and faster in at least ``WIN_SHARE`` of the rounds; a tie in the noise keeps the rules' plan); where
the search's fastest loses it, the next fastest gets one (``CHALLENGERS`` in all).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.core import budget, cells, checks, forward, gradient, kernels, plan, plancache, precision, vjp
from bptt_jax.core.params import RNNSpec

MARGIN = 0.05  # a candidate must beat the rules' plan by 5% to replace it (this CPU's noise: +-4%)
WIN_SHARE = 0.75  # ... and be the faster of the two in at least this share of the head-to-head's rounds
UNROLLS = (2, 4)  # tried for the best plan at the default unroll (1 on a CPU)
COMPILE_SHARE = 0.5  # no candidate is compiled after this share of the time budget
UNROLL_SHARE = 0.7  # the unroll stage starts only before this share
MIN_ROUNDS = 3  # timing rounds per stage at least, whatever the time budget
# Plans that may challenge the rules' plan head-to-head, fastest first, until one wins: the search's
# few rounds rank close plans by noise, and a plan that loses its head-to-head to the rules' plan
# (a tie) hid a faster one ranked second (the Elman cell's kernel at (200, 64, 128, 256, 128): 1.28x
# the rules' plan in two tune runs, not chosen in three of five others; 2026-12-05).
CHALLENGERS = 2
# A timing sample is the mean of as many calls, each waited for, as the plan's second call says would
# last about SAMPLE_S (at most MAX_REPS; later calls are often faster, so a sample often lasts less):
# one call of a small problem (0.1-0.2 ms) is mostly dispatch and scheduling noise,
# which decided the Elman cell's (50, 1, 32, 64, 32) plan by chance (benchmarks/results/
# tune_speed_elman_*_s19_spr.md: 0.76x and 0.93x the best jax.grad contender in two runs, the same
# plans 1.1-1.4x in loops of many calls).
SAMPLE_S = 0.004
MAX_REPS = 64
MIN_BLOCK_ROWS = 128  # no candidate block with fewer rows C*B (the block matmuls would crawl)
BLOCK_DIVISIONS = (2, 4, 8, 16, 32)  # candidate C near T / d


def _concrete(a, rng: np.random.RandomState, integer_high: int):
    """An array for ``a`` (an array as it is; a ``jax.ShapeDtypeStruct``: random values)."""
    if not isinstance(a, jax.ShapeDtypeStruct):
        return a
    if jnp.issubdtype(a.dtype, jnp.integer):
        return jnp.asarray(rng.randint(0, integer_high, a.shape), a.dtype)
    return jnp.asarray(0.3 * rng.randn(*a.shape), a.dtype)


def _divisor_near(t_len: int, c: int) -> int:
    """The divisor of T nearest to c (no padding steps), or c when none lies within a factor of 2."""
    near = [d for d in range(max(c // 2, 1), min(2 * c, t_len) + 1) if t_len % d == 0]
    return min(near, key=lambda d: abs(d - c), default=c)


def candidate_blocks(t_len: int, batch: int, rules_block: int) -> list[int]:
    """The time blocks to try: the rules' block, the whole sequence, and divisors of T near T/d
    with at least ``MIN_BLOCK_ROWS`` rows."""
    blocks = {rules_block, t_len}
    for d in BLOCK_DIVISIONS:
        c = _divisor_near(t_len, max(t_len // d, 1))
        if c * batch >= MIN_BLOCK_ROWS:
            blocks.add(c)
    return sorted(blocks, reverse=True)


def wins_head_to_head(candidate_times, rules_times) -> bool:
    """Whether a candidate replaces the rules' plan, from a head-to-head's times: the k-th time of
    each was taken in the same round (the two run back to back), so their ratio cancels what the
    machine's load did to that round. The median ratio must be at most 1 - ``MARGIN`` and the
    candidate faster in at least ``WIN_SHARE`` of the rounds. (A median of each plan's times alone
    let a plan through that a later side-by-side run measured 0.89x of the rules' plan, and one
    as fast at 3.3x its memory: benchmarks/results/tune_speed_avx512.md, 2026-12-04.)"""
    ratios = np.asarray(candidate_times, dtype=float) / np.asarray(rules_times, dtype=float)
    if ratios.size == 0:
        return False
    return bool(np.median(ratios) <= 1 - MARGIN and np.mean(ratios < 1) >= WIN_SHARE)


def _label(opts: plan.Options) -> str:
    segments = f" checkpoint_every={opts.checkpoint_every}" if opts.checkpoint_every else ""
    return (
        f"block_size={opts.block_size} gates={opts.gates} unroll={opts.unroll} recurrence={opts.recurrence}{segments}"
    )


def tune(
    params,
    spec: RNNSpec,
    xs,
    targets,
    *,
    weights=None,
    lengths=None,
    h0=None,
    output_mask=None,
    generic: bool = False,
    unroll: int | None = None,
    block_size: int | None = None,
    checkpoint_every: int | None = None,
    diagnostics: bool = False,
    with_dxs: bool = False,
    recurrence: str = "auto",
    gates: str = "auto",
    max_memory: int | str | None = None,
    time_budget: float = 60.0,
    rounds: int = 5,
    progress: bool = True,
    record: bool = True,
) -> plan.Plan:
    """Measure the plans of ``bptt(params, spec, xs, targets, **same keywords)`` and cache the fastest.

    Args:
      params, spec, xs, targets, weights, lengths, h0, output_mask: as ``bptt``; arrays or
        ``jax.ShapeDtypeStruct`` (random values are drawn for those, and lengths of T: the plans'
        times do not depend on the values).
      generic, unroll, block_size, checkpoint_every, diagnostics, with_dxs, recurrence, gates: as
        ``bptt``. A choice given here is kept; those left to "auto" / None are tuned.
      max_memory: as ``bptt``'s: only plans whose compiled temp memory fits are timed, checkpoint
        segments among them (not with an output mask), and the winner is cached for calls
        with this budget. Raises ValueError (the smallest budget that would fit) when none fits.
      time_budget: seconds for compiling and timing the candidates (about; the rules' plan is
        always measured, and the timing rounds run after the last compile).
      rounds: interleaved timing rounds per stage (fewer, at least 3, where they would overrun the
        time budget); a plan's time is its median round, each round's sample the mean of as many
        back-to-back calls as last about ``SAMPLE_S`` (a fast plan's single call is mostly noise).
      progress: print a line per candidate and the result to stderr.
      record: write the winner to the plan cache (``plancache``; a directory that cannot be
        written warns, and the plan is still returned).

    Returns:
      The ``plan.Plan`` that later ``bptt`` calls of this problem resolve to.
    """
    start = time.perf_counter()
    rng = np.random.RandomState(0)
    xs = _concrete(xs, rng, 1)
    m = spec.output_size
    targets = _concrete(targets, rng, m)
    params = jax.tree.map(lambda a: _concrete(a, rng, 1), params, is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))
    weights, output_mask = (_concrete(a, rng, 1) if a is not None else None for a in (weights, output_mask))
    if isinstance(lengths, jax.ShapeDtypeStruct):  # every sequence whole: the time a full batch takes
        lengths = jnp.full(lengths.shape, xs.shape[0], lengths.dtype)
    if h0 is not None:
        h0 = jax.tree.map(lambda a: _concrete(a, rng, 1), h0, is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))
    lengths, weights = checks.entry_checks(
        spec, xs, targets, weights, lengths, h0, params, check_values=None, check_finite=False
    )
    asked = plan.Options(generic, unroll, block_size, checkpoint_every, diagnostics, with_dxs, recurrence, gates)
    asked.check(spec, output_mask is not None)
    t_len, batch = xs.shape[0], xs.shape[1]
    layers = jax.tree.leaves((params.layers, params.reverse_layers))
    dtype = jnp.dtype(spec.compute_dtype or jnp.result_type(xs.dtype, *(a.dtype for a in layers)))  # as _bptt
    default = _explicit(asked, plan.resolve(asked, spec, t_len, batch, dtype, use_cache=False))
    args = (params, xs, targets, weights, lengths, h0, output_mask)
    limit = None if max_memory is None else budget.parse_memory(max_memory)
    segments_ok = output_mask is None
    if limit is not None:  # the plan bptt(max_memory=...) runs without a tuned entry: the baseline

        def temp_of(o: plan.Options) -> int:
            fn = jax.jit(functools.partial(gradient._bptt, spec=spec, options=o))
            return budget.temp_bytes(fn.lower(*args).compile())

        unbudgeted = default
        try:
            default = budget.choose(default, spec, t_len, batch, dtype, limit, segments_ok, temp_of)
        except ValueError:
            # no scan plan fits; the compiled kernel's plans need less (its loops keep no scan
            # buffers), and bptt(max_memory=...) runs one where a tuned entry names it: try them
            auto = plan._left_auto(asked, "recurrence")
            if default.recurrence == "native" or not (auto and kernels.native_reason(spec.cell, dtype) is None):
                raise
            native = dataclasses.replace(default, recurrence="native")
            default = budget.choose(native, spec, t_len, batch, dtype, limit, segments_ok, temp_of)
    else:
        unbudgeted = default

    scans = _scans_plan(asked, unbudgeted, spec, t_len, batch, dtype)
    candidates = _candidates(
        default, unbudgeted, asked, spec, t_len, batch, dtype, limit, segments_ok, False, scans=scans
    )

    build = lambda o: functools.partial(gradient._bptt, spec=spec, options=o)  # noqa: E731
    best, measured = _search(default, candidates, build, args, asked, limit, time_budget, rounds, progress, start)
    if record:
        key = plan.cache_key(asked, spec, t_len, batch, dtype, limit)
        if _record(key, best, default, measured, limit):
            gradient._compiled.cache_clear()  # later calls trace again and read the entry
            gradient._within_budget.cache_clear()
    return plan.resolve(best, spec, t_len, batch, dtype, use_cache=False)


def _explicit(asked: plan.Options, p: plan.Plan) -> plan.Options:
    """``asked`` with the choices of the resolved plan ``p`` written out."""
    gates = "store" if p.store else "recompute"
    return dataclasses.replace(asked, block_size=p.block, gates=gates, unroll=p.unroll, recurrence=p.recurrence)


def _scans_plan(asked: plan.Options, rules: plan.Options, spec: RNNSpec, t_len: int, batch: int, dtype) -> plan.Options:
    """The scans' own rules plan where the rules chose the compiled kernel for a recurrence left to
    "auto" (the scan plans ``tune`` times beside the kernel's are found around it); else ``rules``."""
    if rules.recurrence != "native" or not plan._left_auto(asked, "recurrence"):
        return rules
    scan = dataclasses.replace(asked, recurrence="scan")
    return _explicit(asked, plan.resolve(scan, spec, t_len, batch, dtype, use_cache=False))


def _candidates(
    default: plan.Options,
    unbudgeted: plan.Options,
    asked: plan.Options,
    spec: RNNSpec,
    t_len: int,
    batch: int,
    dtype,
    limit: int | None,
    segments_ok: bool,
    divisors_only: bool,
    scans: plan.Options | None = None,
) -> list[plan.Options]:
    """The plans to time, ``default`` first: ``scans`` (the scans' rules plan where the rules chose
    the compiled kernel; otherwise ``unbudgeted``) with the time blocks of ``candidate_blocks`` and (a
    gated cell without segments, not in 16 bits) the gates stored or recomputed, for the choices
    ``asked`` left open; under a budget also ``budget.candidates`` of ``unbudgeted`` (and of
    ``scans``), and only plans whose shape-read lower bound fits. Where the cells' compiled kernel
    can run (``kernels.native_reason``) and ``asked`` leaves recurrence open, also the scans' first
    plan and the whole-sequence block (a gated cell's with the gates stored) with
    recurrence="native", where those are candidates, timed right after ``default``.
    ``divisors_only``: blocks and segments dividing T (the arguments are timed unpadded:
    ``rnn_states``' case)."""
    divides = lambda k: not divisors_only or t_len % k == 0  # noqa: E731
    scans = unbudgeted if scans is None else scans
    gate_choices = ["recompute"]
    if cells.get(spec.cell).CACHE > 0 and asked.checkpoint_every is None and not precision.is_half(dtype):
        gate_choices = ["store", "recompute"]
    out = [default]
    for c in candidate_blocks(t_len, batch, scans.block_size or t_len):
        for g in gate_choices if divides(c) else ():
            o = scans
            if plan._left_auto(asked, "block_size"):
                o = dataclasses.replace(o, block_size=c)
            if plan._left_auto(asked, "gates"):
                o = dataclasses.replace(o, gates=g)
            if o not in out:
                out.append(o)
    if limit is not None:
        ok = segments_ok and asked.checkpoint_every is None
        more = budget.candidates(unbudgeted, spec, t_len, batch, ok)
        more += budget.candidates(scans, spec, t_len, batch, ok) if scans != unbudgeted else []
        out += [
            o
            for o in dict.fromkeys(more)
            if o not in out and (o.checkpoint_every is None or divides(plan.segment_levels(o.checkpoint_every)[0]))
        ]
        out = [o for o in out if budget.stored_bytes(o, spec, t_len, batch, dtype) <= limit]
    if plan._left_auto(asked, "recurrence") and kernels.native_reason(spec.cell, dtype) is None:
        # the compiled kernel in the plans it ran fastest in (benchmarks/native_blocks.py: the whole
        # sequence as one block with the gates stored, and the scans' blocks), timed right after the
        # default so that a short time budget still measures them
        first = scans if scans in out else out[0]  # the scans' rules plan (default where it fits a budget)
        whole = dataclasses.replace(first, block_size=t_len, gates=gate_choices[0])  # gated: stored
        native = [dataclasses.replace(o, recurrence="native") for o in (first, whole) if o in out]
        out = out[:1] + [o for o in dict.fromkeys(native) if o != out[0]] + out[1:]
        out = list(dict.fromkeys(out))
    return out


def _search(
    default: plan.Options,
    candidates: list[plan.Options],
    build: Callable[[plan.Options], Callable],
    args: tuple,
    asked: plan.Options,
    limit: int | None,
    time_budget: float,
    rounds: int,
    progress: bool,
    start: float,
) -> tuple[plan.Options, dict]:
    """Compile ``build(o)`` for each candidate (``default`` first: the plan the call runs without an
    entry), time them in interleaved rounds within the time budget, try the unrolls for the best
    (a scan plan, when ``asked`` leaves unroll open), and confirm a winner other than ``default``
    head-to-head.
    Returns (the plan to record, the measurements by plan)."""
    measured: dict[plan.Options, dict] = {}

    def say(text: str) -> None:
        if progress:
            print(f"tune: {text}", file=sys.stderr, flush=True)

    def compile_one(o: plan.Options, i: int, n: int) -> None:
        t0 = time.perf_counter()
        compiled = jax.jit(build(o)).lower(*args).compile()
        mem = compiled.memory_analysis()
        t1 = time.perf_counter()
        jax.block_until_ready(compiled(*args))  # warm-up
        call_s = time.perf_counter() - t1
        if call_s < 10 * SAMPLE_S:  # a first call costs more: the second says how many make a sample
            t1 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            call_s = time.perf_counter() - t1
        measured[o] = {
            "fn": compiled,
            "call_s": call_s,
            "reps": int(min(MAX_REPS, max(1, SAMPLE_S // max(call_s, 1e-9)))),
            "temp_bytes": int(getattr(mem, "temp_size_in_bytes", -1)),
            "times": [],
        }
        over = limit is not None and measured[o]["temp_bytes"] > limit
        if over:
            del measured[o]  # over the budget: not timed
        say(
            f"[{i}/{n}] {_label(o)}: compiled in {time.perf_counter() - t0:.1f} s"
            + (", over max_memory" if over else "")
        )

    def time_rounds(opts: list[plan.Options], share: float) -> None:
        """``rounds`` interleaved rounds, fewer (at least MIN_ROUNDS) where they would take more than
        ``share`` of what is left of the time budget."""
        left = max(time_budget - (time.perf_counter() - start), 0.0)
        per_round = sum(measured[o]["call_s"] * measured[o]["reps"] for o in opts)
        n = max(min(MIN_ROUNDS, rounds), min(rounds, int(share * left / max(per_round, 1e-9))))
        for r in range(n):
            order = opts[r % len(opts) :] + opts[: r % len(opts)]  # a rotating order per round
            for o in order:
                fn, reps = measured[o]["fn"], measured[o]["reps"]
                t0 = time.perf_counter()
                for _ in range(reps):  # each call waited for, as one call was (its latency)
                    jax.block_until_ready(fn(*args))
                measured[o]["times"].append((time.perf_counter() - t0) / reps)

    n = len(candidates)
    for i, o in enumerate(candidates, 1):  # compiling gets half the time budget, timing the rest
        if o is not default and time.perf_counter() - start > COMPILE_SHARE * time_budget:
            say(f"time budget of {time_budget:.0f} s spent: {n - i + 1} candidates not measured")
            break
        compile_one(o, i, n)
    time_rounds(list(measured), 0.5)
    median = lambda o: float(np.median(measured[o]["times"]))  # noqa: E731
    best = min(measured, key=median)
    unrolled = best.recurrence == "scan"  # the kernels have no unroll: other unrolls are the same program
    if plan._left_auto(asked, "unroll") and unrolled and time.perf_counter() - start <= UNROLL_SHARE * time_budget:
        more = [dataclasses.replace(best, unroll=u) for u in UNROLLS if u != best.unroll]
        for i, o in enumerate(more, 1):
            compile_one(o, i, len(more))
        if more:
            for o in measured:
                measured[o]["times"] = []
            time_rounds(list(measured), 0.5)
            best = min(measured, key=median)
    if best != default:  # a head-to-head of twice the rounds confirms the winner (noise picks too)
        faster = [o for o in sorted(measured, key=median) if o != default and median(o) < median(default)]
        best = default
        for challenger in faster[:CHALLENGERS]:  # the fastest first; the next where it ties
            for o in measured:
                measured[o]["times"] = []
            for _ in range(2):
                time_rounds([default, challenger], 0.5)  # each round times both: their times pair up
            if wins_head_to_head(measured[challenger]["times"], measured[default]["times"]):
                best = challenger
                break
    say(
        f"{_label(best)}: {1e3 * median(best):.2f} ms, {median(default) / median(best):.2f}x the rules' plan "
        f"({_label(default)}: {1e3 * median(default):.2f} ms); {len(measured)} plans in {time.perf_counter() - start:.0f} s"
    )
    for o in measured:  # the last rounds each plan took part in (the head-to-head's: two of them)
        measured[o]["median"] = median(o) if measured[o]["times"] else None
    return best, measured


def _record(key: str, best: plan.Options, default: plan.Options, measured: dict, limit: int | None) -> bool:
    """Writes the winner's entry to the plan cache; whether it was written."""
    entry: dict = {f: getattr(best, f) for f in plan.TUNABLE}
    if limit is not None:
        entry["checkpoint_every"] = best.checkpoint_every
    entry.update(
        seconds=measured[best]["median"],
        rules_seconds=measured[default]["median"],
        temp_bytes=measured[best]["temp_bytes"],
        rules_temp_bytes=measured[default]["temp_bytes"],
        plans_measured=len(measured),
        tuned_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return plancache.record(key, entry)


def tune_states(
    params,
    spec: RNNSpec,
    xs,
    *,
    h0=None,
    lengths=None,
    unroll: int | None = None,
    recurrence: str = "auto",
    gates: str = "auto",
    block_size: int | None = None,
    checkpoint_every: int | tuple[int, ...] | None = None,
    max_memory: int | str | None = None,
    time_budget: float = 60.0,
    rounds: int = 5,
    progress: bool = True,
    record: bool = True,
) -> plan.Plan:
    """``tune`` for ``rnn_states`` (and so for the NNX and Equinox layers, whose ``tune`` methods
    call it): measure the plans of one forward + backward of ``rnn_states(params, spec, xs, **same
    keywords)`` with ``grad="bptt"`` on this machine and cache the fastest; later ``rnn_states`` calls of
    the same problem (the same shapes, options and budget) read it when they are traced.

    Args:
      params, spec, xs, h0, lengths: as ``rnn_states``; arrays or ``jax.ShapeDtypeStruct`` (random
        values are drawn for those, and lengths of T).
      unroll, recurrence, gates, block_size, checkpoint_every, max_memory: as ``rnn_states``. A
        choice given here is kept; those left to "auto" / None are tuned. With ``max_memory`` only
        plans that fit are timed, checkpoint segments among them.
      time_budget, rounds, progress, record: as ``tune``.

    Returns:
      The ``plan.Plan`` later calls run: its block, gates stored or not, segments, unroll and
      recurrence (``with_dxs``: the layer's backward pass always returns dX).
    """
    start = time.perf_counter()
    rng = np.random.RandomState(0)
    is_struct = lambda a: isinstance(a, jax.ShapeDtypeStruct)  # noqa: E731
    xs = _concrete(xs, rng, 1)
    params = jax.tree.map(lambda a: _concrete(a, rng, 1), params, is_leaf=is_struct)
    if h0 is not None:
        h0 = jax.tree.map(lambda a: _concrete(a, rng, 1), h0, is_leaf=is_struct)
    if is_struct(lengths):  # every sequence whole: the time a full batch takes
        lengths = jnp.full(lengths.shape, xs.shape[0], lengths.dtype)
    limit = None if max_memory is None else budget.parse_memory(max_memory)
    asked, xs, h0, lengths, _ = vjp.prepare(
        params, spec, xs, h0, lengths, "bptt", unroll, recurrence, gates, block_size, checkpoint_every
    )
    t_len, batch = xs.shape[:2]
    dtype = jnp.dtype(spec.compute_dtype or xs.dtype)  # as rnn_states' plan
    rules_unroll, rules_rec, layout = vjp._plan(params, spec, asked, xs, h0, lengths, None, use_cache=False)
    top = jax.eval_shape(lambda: vjp._plain(spec, rules_unroll, rules_rec, params, xs, h0, lengths)[0])
    ct = jnp.asarray(0.3 * rng.randn(*top.shape), top.dtype)
    width = max(plan.block_width(spec), top.shape[-1])
    store = plan.resolve_gates(layout[0], spec, t_len, batch, layout[2], dtype)
    default = dataclasses.replace(
        asked,
        block_size=vjp._block(spec, layout, t_len, batch, width, rules_rec),
        gates="store" if store else "recompute",
        unroll=rules_unroll,
        recurrence=rules_rec,
    )
    unbudgeted = default
    args = (params, xs, h0, lengths, ct)
    if limit is not None:  # the plan rnn_states(max_memory=...) runs without a tuned entry: the baseline
        leaves, structure = jax.tree_util.tree_flatten(args[:4])
        signature = tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in leaves)
        gates_b, block_b, every_b = vjp._within_budget(
            spec, rules_unroll, rules_rec, layout, limit, signature, structure
        )
        default = dataclasses.replace(default, gates=gates_b, block_size=block_b, checkpoint_every=every_b)

    scans = unbudgeted
    if rules_rec == "native" and plan._left_auto(asked, "recurrence"):  # the rules chose the kernel
        scan_gates = "store" if plan.resolve_gates(layout[0], spec, t_len, batch, layout[2], dtype) else "recompute"
        scans = dataclasses.replace(
            unbudgeted,
            block_size=vjp._block(spec, layout, t_len, batch, width, "scan"),
            gates=scan_gates,
            recurrence="scan",
        )
    candidates = _candidates(default, unbudgeted, asked, spec, t_len, batch, dtype, limit, True, True, scans=scans)

    def build(o: plan.Options):
        rec = kernels.resolve(o.recurrence, spec.hidden_sizes, dtype, cell=spec.cell)
        lay = (o.gates, o.block_size, o.checkpoint_every)
        return vjp.states_fwd_bwd(spec, forward.resolve_unroll(o.unroll), rec, lay)

    best, measured = _search(default, candidates, build, args, asked, limit, time_budget, rounds, progress, start)
    if record:
        key = plan.cache_key(asked, spec, t_len, batch, dtype, limit, entry="rnn_states")
        if _record(key, best, default, measured, limit):
            vjp._within_budget.cache_clear()
    return plan.Plan(
        block=best.block_size or t_len,
        store=best.gates == "store",
        segment=best.checkpoint_every,
        unroll=forward.resolve_unroll(best.unroll),
        recurrence=kernels.resolve(best.recurrence, spec.hidden_sizes, dtype, cell=spec.cell),
        with_dxs=True,
    )
