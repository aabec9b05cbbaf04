"""``max_memory``: the plan ``bptt`` runs under a budget fits it by the compiled program's own memory
analysis, and gives jax.grad's gradient (float64, 1e-10); too small a budget names the smallest one
that fits, and that one then works; budgets are parsed with named errors; a budget works under an
outer jit and through ``tune``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bptt_jax as bj
from bptt_jax.core import budget, gradient, plan
from tests import reference as ref

T, B = 24, 2


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path))
    gradient._within_budget.cache_clear()
    yield tmp_path
    gradient._within_budget.cache_clear()


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
    cell=st.sampled_from(["elman", "gru", "lstm"]), fraction=st.sampled_from([1.0, 0.5, 0.25]), seed=st.integers(0, 99)
)
def test_the_plan_under_a_budget_fits_and_gives_autodiffs_gradient(cell, fraction, seed):
    with jax.enable_x64(True):
        p, spec = _problem(cell, seed=seed)
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


def test_bidirectional_budget_without_segments():
    with jax.enable_x64(True):
        p, spec = _problem("lstm", bidirectional=True)
        with pytest.raises(ValueError, match="checkpoint segments, the leanest plans, need a unidirectional"):
            bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory="1KiB")
        default = _temp(p, spec, plan.explicit(plan.Options(), spec, T, B, jnp.float64))
        _, grads, _ = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, max_memory=default)
        assert _chosen(p, spec, default).checkpoint_every is None


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
        limit = default // 3
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
