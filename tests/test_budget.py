"""``max_memory``: the plan ``bptt`` runs under a budget fits it by the compiled program's own memory
analysis, and gives jax.grad's gradient (float64, 1e-10); too small a budget names the smallest one
that fits, and that one then works; budgets are parsed with named errors; a budget works under an
outer jit and through ``tune``. The same for ``rnn_states`` (the layers' custom VJP) and the NNX and
Equinox layers' ``max_memory``: the chosen (gates, block) fits by the compiled forward + backward's
memory analysis and equals ``grad="autodiff"``.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bptt_jax as bj
from bptt_jax.core import budget, checks, gradient, plan, vjp
from tests import reference as ref

T, B = 24, 2


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path))
    gradient._within_budget.cache_clear()
    vjp._within_budget.cache_clear()
    yield tmp_path
    gradient._within_budget.cache_clear()
    vjp._within_budget.cache_clear()


def _problem(cell, bidirectional=False, seed=0, dtype=jnp.float64):
    spec = bj.RNNSpec(3, (6,), 4, cell=cell, bidirectional=bidirectional)
    return ref.make_problem(spec, T, B, seed=seed, use_lengths=True, dtype=dtype), spec


def _temp(p, spec, options: plan.Options) -> int:
    """The compiled temp memory of ``options`` for this problem: an independent measurement."""
    fn = jax.jit(functools.partial(gradient._bptt, spec=spec, options=options))
    return budget.temp_bytes(fn.lower(p.params, p.xs, p.targets, None, p.lengths, None, None).compile())


def _chosen(p, spec, limit) -> plan.Options:
    (chosen,) = [
        gradient._within_budget(spec, dataclasses.astuple(plan.Options()), limit, sig, struct)
        for sig, struct in [_signature(p)]
    ]
    return chosen


def _signature(p):
    args = (p.params, p.xs, p.targets, None, p.lengths, None, None)
    leaves = jax.tree_util.tree_leaves(args, is_leaf=lambda a: a is None)
    sig = tuple((tuple(a.shape), str(a.dtype)) if a is not None else None for a in leaves)
    return sig, jax.tree_util.tree_structure(args, is_leaf=lambda a: a is None)


@settings(max_examples=4)
@given(
    cell=st.sampled_from(["elman", "gru", "lstm"]),
    bidirectional=st.booleans(),
    fraction=st.sampled_from([1.0, 0.5, 0.25]),
    seed=st.integers(0, 99),
)
def test_the_plan_under_a_budget_fits_and_gives_autodiffs_gradient(cell, bidirectional, fraction, seed):
    with jax.enable_x64(True):
        p, spec = _problem(cell, bidirectional, seed=seed)
        default = _temp(p, spec, plan.explicit(plan.Options(), spec, T, B, jnp.float64))
        limit = int(default * fraction)
        try:
            div, grads, aux = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory=limit)
        except ValueError as e:  # too lean for any plan: the error names a budget that does fit
            need = int(str(e).split("(")[-1].split(" bytes")[0])
            assert need > limit
            div, grads, aux = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory=need)
            limit = need
        assert _temp(p, spec, _chosen(p, spec, limit)) <= limit
        loss = lambda params: bj.loss(params, spec, p.xs, p.targets, lengths=p.lengths)  # noqa: E731
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), grads, jax.grad(loss)(p.params)
        )
        np.testing.assert_allclose(div, loss(p.params), rtol=1e-12)


def test_a_lean_budget_takes_segments_and_too_small_a_budget_names_the_smallest():
    with jax.enable_x64(True):
        p, spec = _problem("gru")
        default = _temp(p, spec, plan.explicit(plan.Options(), spec, T, B, jnp.float64))
        with pytest.raises(ValueError, match=r"max_memory=1000 B: no plan of this gradient fits; the leanest") as e:
            bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory=1000)
        need = int(str(e.value).split("(")[-1].split(" bytes")[0])
        assert 1000 < need < default
        bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory=need)  # the named budget fits
        chosen = _chosen(p, spec, need)
        assert _temp(p, spec, chosen) == need
        assert chosen.checkpoint_every is not None or chosen.block_size < T  # a lean plan, not the default


def test_bidirectional_lean_budget_takes_segments_output_mask_none():
    """A bidirectional network's leanest plans are checkpoint segments too; with an output mask
    there are none, and the error says so."""
    with jax.enable_x64(True):
        p, spec = _problem("lstm", bidirectional=True)
        with pytest.raises(
            ValueError, match=r"the leanest \(block_size=\d+, gates='recompute', checkpoint_every=\d+\)"
        ) as e:
            bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory="1KiB")
        need = int(str(e.value).split("(")[-1].split(" bytes")[0])
        default = _temp(p, spec, plan.explicit(plan.Options(), spec, T, B, jnp.float64))
        assert need < default
        div, grads, _ = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory=need)
        chosen = _chosen(p, spec, need)
        assert chosen.checkpoint_every is not None and _temp(p, spec, chosen) == need
        loss = lambda params: bj.loss(params, spec, p.xs, p.targets, lengths=p.lengths)  # noqa: E731
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), grads, jax.grad(loss)(p.params)
        )
        mask = jnp.ones((T, B, 12), jnp.float64)
        with pytest.raises(
            ValueError, match="checkpoint segments, the leanest plans, cannot be combined with output_mask"
        ):
            bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, output_mask=mask, max_memory="1KiB")


def test_a_budget_under_an_outer_jit():
    p, spec = _problem("elman", dtype=jnp.float32)
    step = jax.jit(
        lambda params: bj.bptt(params, spec, p.xs, p.targets, lengths=p.lengths, max_memory="64MiB")[1],
    )
    want = jax.grad(lambda params: bj.loss(params, spec, p.xs, p.targets, lengths=p.lengths))(p.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), step(p.params), want)


def test_tune_under_a_budget_records_a_plan_that_fits(cache):
    with jax.enable_x64(True):
        p, spec = _problem("gru")
        default = _temp(p, spec, plan.explicit(plan.Options(), spec, T, B, jnp.float64))
        limit = default // 2  # a third was too little on an H200 (its leanest plan: 0.34x of the default)
        chosen = bj.tune(
            p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory=limit, time_budget=30, progress=False
        )
        options = dataclasses.replace(
            plan.Options(),
            block_size=chosen.block,
            gates="store" if chosen.store else "recompute",
            unroll=chosen.unroll,
            checkpoint_every=chosen.segment,
            recurrence=chosen.recurrence,
        )
        assert _temp(p, spec, options) <= limit
        assert _chosen(p, spec, limit) == options  # bptt(max_memory=limit) now runs the tuned plan
        with pytest.raises(ValueError, match="no plan of this gradient fits"):
            bj.tune(p.params, spec, p.xs, p.targets, max_memory=100, time_budget=5, progress=False)


@pytest.mark.parametrize(
    "value, expected",
    [(4096, 4096), ("512MiB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)), ("800MB", 800 * 10**6), ("2e9", 2 * 10**9)],
)
def test_parse_memory(value, expected):
    assert budget.parse_memory(value) == expected


@pytest.mark.parametrize("value", [0, -5, True, "lots", "5 parsecs", "0.1B", 1.5])
def test_parse_memory_refuses_by_name(value):
    with pytest.raises(ValueError, match="max_memory: expected"):
        budget.parse_memory(value)


# ----------------------------------------------------------------------------- rnn_states, the layers


def _public_h0(spec, dtype):
    zeros = lambda n1: jnp.zeros((B, n1), dtype)  # noqa: E731
    return tuple((zeros(n1), zeros(n1)) if spec.is_lstm else zeros(n1) for n1 in spec.state_sizes())


def _states_temp(p, spec, gates, block_size, checkpoint_every=None) -> int:
    """The compiled temp memory of rnn_states' forward + backward with this layout (h0 an argument,
    as the layers pass it): measured here by jax.vjp of the public call, independently of
    ``vjp._within_budget``."""

    def fwd_bwd(params, xs, h0, ct):
        def f(a, b, c):
            kw = dict(gates=gates, block_size=block_size, checkpoint_every=checkpoint_every)
            return vjp.rnn_states(a, spec, b, h0=c, lengths=p.lengths, **kw)

        return jax.vjp(f, params, xs, h0)[1](ct)

    ct = jax.ShapeDtypeStruct((p.xs.shape[0], B, spec.merged_size(spec.num_layers - 1)), p.xs.dtype)
    h0 = _public_h0(spec, p.xs.dtype)
    return budget.temp_bytes(jax.jit(fwd_bwd).lower(p.params, p.xs, h0, ct).compile())


@settings(max_examples=4)
@given(
    cell=st.sampled_from(["elman", "gru", "lstm"]),
    bidirectional=st.booleans(),
    fraction=st.sampled_from([1.0, 0.6, 0.3]),
    seed=st.integers(0, 99),
    dtype=st.sampled_from([jnp.float64, jnp.float32]),
)
def test_rnn_states_under_a_budget_fits_and_equals_autodiff(cell, bidirectional, fraction, seed, dtype):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == jnp.float64 else dict(rtol=2e-4, atol=1e-5)
    with jax.enable_x64(True):
        p, spec = _problem(cell, bidirectional=bidirectional, seed=seed, dtype=dtype)
        ct = ref.on_device(np.random.RandomState(seed).randn(T, B, spec.merged_size(0)), dtype)
        limit = int(_states_temp(p, spec, "auto", None) * fraction)

        h0 = _public_h0(spec, p.xs.dtype)

        def grads(**kw):
            f = lambda a, b: jnp.sum(vjp.rnn_states(a, spec, b, h0=h0, lengths=p.lengths, **kw) * ct)  # noqa: E731
            return jax.jit(jax.grad(f, argnums=(0, 1)))(p.params, p.xs)  # one program per call

        try:
            got = grads(max_memory=limit)
        except ValueError as e:  # too lean for any layout: the error names a budget that does fit
            need = int(re.search(r"\((\d+) bytes\)", str(e)).group(1))
            assert need > limit
            limit = need
            got = grads(max_memory=limit)
        (sig, struct), *_ = [_states_signature(p)]
        gates, block, k = vjp._within_budget(spec, 1, "scan", ("auto", None, None), limit, sig, struct)
        assert k is None or T % k == 0
        assert _states_temp(p, spec, gates, block, k) <= limit
        want = grads(grad="autodiff")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), got, want)


def _states_signature(p):
    h0 = tuple(jnp.zeros((B, w), p.xs.dtype) for w in p.spec.state_widths())
    leaves, structure = jax.tree_util.tree_flatten((p.params, p.xs, h0, p.lengths))
    return tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in leaves), structure


def test_rnn_states_options_are_checked_by_name():
    p, spec = _problem("elman", dtype=jnp.float32)
    with pytest.raises(ValueError, match="gates='store': the Elman cell has no gates"):
        vjp.rnn_states(p.params, spec, p.xs, gates="store")
    with pytest.raises(ValueError, match="block_size: expected a positive int"):
        vjp.rnn_states(p.params, spec, p.xs, block_size=0)
    with pytest.raises(ValueError, match="max_memory: expected bytes"):
        vjp.rnn_states(p.params, spec, p.xs, max_memory="lots")


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_rnn_states_segments_equal_autodiff_and_meet_a_lean_budget(cell):
    """rnn_states(checkpoint_every=k) for a two-layer stack with lengths, h0 and the final states
    differentiated too: k dividing T, not dividing it (the last segment padded), beyond T, and nested
    levels (dividing T or padded) give grad="autodiff"'s gradients (float64, 1e-10). A
    budget below every unsegmented layout is then met by segments: the chosen plan has them, its
    compiled temp memory fits, and its gradients are the same (at 2T steps: at T the segments' fixed
    costs are about what they save)."""
    with jax.enable_x64(True):
        spec = bj.RNNSpec(3, (6, 5), 4, cell=cell)
        h0 = jax.tree.map(lambda a: a + 0.1, _public_h0(spec, jnp.float64))

        def grads(p, **kw):
            ct = ref.on_device(np.random.RandomState(1).randn(p.xs.shape[0], B, 5), jnp.float64)

            def f(a, b, c):
                states, last = vjp.rnn_states(a, spec, b, h0=c, lengths=p.lengths, return_last=True, **kw)
                return jnp.sum(states * ct) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(last))

            return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(p.params, p.xs, h0)

        def check(got, want):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got, want)

        p = ref.make_problem(spec, T, B, seed=5, use_lengths=True, use_h0=True, dtype=jnp.float64)
        want = grads(p, grad="autodiff")
        for k in (1, 4, 5, 6, 7, T, T + 3, (12, 4), (10, 5), (6, 3, 1)):
            check(grads(p, checkpoint_every=k), want)
        t2 = 2 * T
        p = ref.make_problem(spec, t2, B, seed=6, use_lengths=True, dtype=jnp.float64)
        unsegmented = min(_states_temp(p, spec, "recompute", c) for c in range(1, t2 + 1) if t2 % c == 0)
        limit = int(0.85 * unsegmented)  # clear of it: the two measures differ by a few bytes
        (sig, struct), *_ = [_states_signature(p)]
        gates, block, k = vjp._within_budget(spec, 1, "scan", ("auto", None, None), limit, sig, struct)
        assert k is not None and t2 % k == 0
        assert _states_temp(p, spec, gates, block, k) <= limit
        check(grads(p, max_memory=limit), grads(p, grad="autodiff"))


def test_rnn_states_segments_are_checked_by_name():
    p, spec = _problem("gru", dtype=jnp.float32)
    with pytest.raises(ValueError, match="each dividing the one before"):
        vjp.rnn_states(p.params, spec, p.xs, checkpoint_every=(12, 5))
    with pytest.raises(ValueError, match="checkpoint_every: expected"):
        vjp.rnn_states(p.params, spec, p.xs, checkpoint_every=0)
    bi = dataclasses.replace(spec, bidirectional=True)
    params = bj.init_params(jax.random.key(0), bi)
    ct = jnp.cos(jnp.arange(T * B * 2 * 6, dtype=jnp.float32)).reshape(T, B, 12)
    f = lambda a, x, **kw: jnp.sum(vjp.rnn_states(a, bi, x, lengths=jnp.array([T, 7]), **kw) * ct)  # noqa: E731
    got, want = (
        jax.grad(f, argnums=(0, 1))(params, p.xs, **kw) for kw in ({"checkpoint_every": 5}, {"grad": "autodiff"})
    )
    assert ref.max_rel_err(got, want) < 1e-5  # a bidirectional stack's segments (float32)
    nested = jax.grad(f, argnums=(0, 1))(params, p.xs, checkpoint_every=(12, 4))
    assert ref.max_rel_err(nested, want) < 1e-5  # and nested ones
    with pytest.raises(ValueError, match="each dividing the one before"):
        vjp.rnn_states(params, bi, p.xs, checkpoint_every=(12, 5))


def test_the_layers_take_a_budget():
    """NNX RNN, StackedRNN and the Equinox RNN with max_memory: the gradient of a loss equals the
    same layer's grad="autodiff" (float64), and a bad budget is refused when the layer is built."""
    from flax import nnx

    from bptt_jax.layers import equinox as beqx
    from bptt_jax.layers import nnx as bnnx

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.RandomState(0).randn(B, T, 3))
        lengths = jnp.array([T, T // 2])
        builds = {
            "nnx RNN": lambda g, m: bnnx.RNN(
                3, 6, cell="lstm", grad=g, max_memory=m, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
            ),
            "nnx StackedRNN": lambda g, m: bnnx.StackedRNN(
                3,
                (6, 5),
                cell="gru",
                bidirectional=True,
                grad=g,
                max_memory=m,
                param_dtype=jnp.float64,
                rngs=nnx.Rngs(0),
            ),
        }
        for build in builds.values():
            grads = {}
            for g, m in (("bptt", "60KiB"), ("autodiff", None)):
                model = build(g, m)
                loss = lambda mdl: jnp.sum(jnp.sin(mdl(x, seq_lengths=lengths)))  # noqa: E731
                grads[g] = nnx.grad(loss)(model)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), *grads.values())
        eqx_grads = []
        for g, m in (("bptt", "60KiB"), ("autodiff", None)):
            rnn = beqx.RNN(3, 6, cell="gru", grad=g, max_memory=m, dtype=jnp.float64, key=jax.random.key(0))
            eqx_grads.append(jax.grad(lambda r: jnp.sum(jnp.sin(r(x, length=lengths))))(rnn))
        for a, b in zip(*map(jax.tree.leaves, eqx_grads)):  # the static fields (grad, max_memory) differ
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="max_memory: expected bytes"):
        bnnx.RNN(3, 6, max_memory="lots", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gates: expected one of"):
        beqx.RNN(3, 6, gates="sometimes", key=jax.random.key(0))


def test_the_layers_take_checkpoint_segments():
    """NNX RNN, StackedRNN and the Equinox RNN with checkpoint_every: the gradient of a loss (and,
    for the NNX RNN, of its final carry) equals the same layer's grad="autodiff" (float64); k is
    checked at construction; nested levels run too (the Equinox layer's (8, 4)); a k that does not
    divide T pads the last segment, and a
    bidirectional stack takes segments too (same gradients)."""
    from flax import nnx

    from bptt_jax.layers import equinox as beqx
    from bptt_jax.layers import nnx as bnnx

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.RandomState(2).randn(B, T, 3))
        lengths = jnp.array([T, 5])
        kw = lambda: dict(param_dtype=jnp.float64, rngs=nnx.Rngs(1))  # noqa: E731  (the same weights each time)
        builds = [
            lambda g, k: bnnx.RNN(3, 6, cell="lstm", grad=g, checkpoint_every=k, return_carry=True, **kw()),
            lambda g, k: bnnx.StackedRNN(3, (6, 5), cell="elman", grad=g, checkpoint_every=k, **kw()),
        ]

        def loss(mdl):
            out = mdl(x, seq_lengths=lengths)
            return sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(out))

        for build in builds:
            want = nnx.grad(loss)(build("autodiff", None))
            got = nnx.grad(loss)(build("bptt", 6))
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got, want)
        eqx_grads = []
        for g, k in (("bptt", (8, 4)), ("autodiff", None)):  # nested segments
            rnn = beqx.RNN(3, 6, cell="gru", grad=g, checkpoint_every=k, dtype=jnp.float64, key=jax.random.key(0))
            eqx_grads.append(jax.grad(lambda r: jnp.sum(jnp.sin(r(x, length=lengths))))(rnn))
        for a, b in zip(*map(jax.tree.leaves, eqx_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        want = nnx.grad(loss)(builds[0]("autodiff", None))
        got = nnx.grad(loss)(builds[0]("bptt", 5))  # T = 24: four segments of 5, then 4 steps + 1 padding step
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got, want)
        bi = lambda g, k: bnnx.StackedRNN(3, (6, 5), bidirectional=True, grad=g, checkpoint_every=k, **kw())  # noqa: E731
        want, got = nnx.grad(loss)(bi("autodiff", None)), nnx.grad(loss)(bi("bptt", 8))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got, want)
    with pytest.raises(ValueError, match="each dividing the one before"):
        beqx.RNN(3, 6, checkpoint_every=(8, 3), key=jax.random.key(0))
    with pytest.raises(ValueError, match="checkpoint_every: expected"):
        bnnx.RNN(3, 6, checkpoint_every=-2, rngs=nnx.Rngs(0))


def test_nested_segments_in_budgets_and_cached_plans():
    """The budget's candidates end with two nested levels (bidirectional networks too), whose shape-read lower
    bound counts every level's boundaries; a cached entry's checkpoint_every may be such a list (as
    JSON keeps a tuple), and one that does not nest is refused."""
    from bptt_jax.core import plancache

    spec = bj.RNNSpec(3, (6,), 4, cell="gru")
    first = plan.explicit(plan.Options(), spec, 1000, 2, jnp.float32)
    nested = [
        o.checkpoint_every
        for o in budget.candidates(first, spec, 1000, 2, True)
        if isinstance(o.checkpoint_every, tuple)
    ]
    assert len(nested) == 1 and nested[0][0] % nested[0][1] == 0
    k1, k2 = nested[0]
    per_step = 2 * 6 * 4
    lean = dataclasses.replace(first, gates="recompute", checkpoint_every=(k1, k2))
    assert budget.stored_bytes(lean, spec, 1000, 2, jnp.float32) == (1000 // k1 + k1 // k2 + k2) * per_step
    bidir = bj.RNNSpec(3, (6,), 4, cell="gru", bidirectional=True)  # nested after every single level
    levels = [o.checkpoint_every for o in budget.candidates(first, bidir, 1000, 2, True) if o.checkpoint_every]
    assert levels[-1] == (k1, k2) and all(isinstance(k, int) for k in levels[:-1])
    entry = dict(block_size=10, gates="recompute", unroll=1, recurrence="scan")
    assert plancache.valid_entry({**entry, "checkpoint_every": [100, 10]}, spec, 1000)
    assert plancache.valid_entry({**entry, "checkpoint_every": 100}, spec, 1000)
    for bad in ([100, 30], [10, 100], [100, True], "100"):
        assert not plancache.valid_entry({**entry, "checkpoint_every": bad}, spec, 1000)
    assert plan.Options(checkpoint_every=[100, 10]).checkpoint_every == (100, 10)


def test_the_candidates_nest_only_levels_that_divide():
    """For every T from 64 to 400 the budget's candidates are valid plans (a prime outer level
    such as T = 173's k1 = 31 gives no nested candidate rather than an invalid one), and bptt
    under a budget runs at such a T with jax.grad's gradients (float64); so does rnn_states under a
    budget that only segments meet, at a prime T (61: its segments padded)."""
    spec = bj.RNNSpec(3, (4,), 2)
    for t_len in range(64, 401):
        first = plan.explicit(plan.Options(), spec, t_len, 2, jnp.float32)
        for o in budget.candidates(first, spec, t_len, 2, True):
            levels = plan.segment_levels(o.checkpoint_every)
            assert all(a % b == 0 and a > b > 1 for a, b in zip(levels, levels[1:])), (t_len, levels)
    with jax.enable_x64(True):
        p = ref.make_problem(spec, 173, 2, seed=1, dtype=jnp.float64)
        div, grads, _ = bj.bptt(p.params, spec, p.xs, p.targets, max_memory="1GiB")
        want = jax.grad(lambda a: bj.loss(a, spec, p.xs, p.targets))(p.params)
        assert ref.max_rel_err(grads, want) < 1e-10
        wide = bj.RNNSpec(3, (16,), 2)
        q = ref.make_problem(wide, 61, 4, seed=2, use_lengths=True, dtype=jnp.float64)
        _, h0, _ = checks.check_inputs(q.params, wide, q.xs, None, q.lengths)
        args = (q.params, q.xs, h0, q.lengths, jnp.zeros((61, 4, 16)))
        temp = lambda c: budget.temp_bytes(  # noqa: E731
            jax.jit(vjp.states_fwd_bwd(wide, 1, "scan", ("recompute", c, None))).lower(*args).compile()
        )
        limit = int(0.85 * min(temp(1), temp(61)))  # below every unsegmented plan (61 is prime: C = 1 or 61)
        f = lambda a, x, **kw: jnp.sum(jnp.sin(vjp.rnn_states(a, wide, x, lengths=q.lengths, **kw)))  # noqa: E731
        got = jax.grad(f, argnums=(0, 1))(q.params, q.xs, max_memory=limit)
        want = jax.grad(f, argnums=(0, 1))(q.params, q.xs, grad="autodiff")
        assert ref.max_rel_err(got, want) < 1e-10
        leaves, struct = jax.tree_util.tree_flatten((q.params, q.xs, h0, q.lengths))
        sig = tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in leaves)
        gates, block, k = vjp._within_budget(wide, 1, "scan", ("auto", None, None), limit, sig, struct)
        assert k is not None and 61 % plan.segment_levels(k)[0] != 0  # padded segments: 61 is prime


def test_a_bidirectional_budget_only_nested_segments_meet():
    """A bidirectional GRU at T = 512 under a budget of exactly the nested candidate's compiled temp
    memory: no earlier candidate (the single levels among them) fits, the plan chosen is the nested
    (k1, k2), and bptt under that budget gives jax.grad's gradients (float32)."""
    spec = bj.RNNSpec(4, (32,), 4, cell="gru", bidirectional=True)
    p = ref.make_problem(spec, 512, 4, seed=1, use_lengths=True)
    first = plan.explicit(plan.Options(), spec, 512, 4, jnp.float32)
    nested = budget.candidates(first, spec, 512, 4, True)[-1]
    assert isinstance(nested.checkpoint_every, tuple)
    limit = _temp(p, spec, nested)
    assert _chosen(p, spec, limit) == nested
    _, grads, _ = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory=limit)
    want = jax.grad(lambda a: bj.loss(a, spec, p.xs, p.targets, lengths=p.lengths))(p.params)
    assert ref.max_rel_err(grads, want) < 1e-5
