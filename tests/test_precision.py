"""Mixed precision (``RNNSpec.compute_dtype``): the explicit BPTT against its two oracles.

The oracle for a reduced-precision gradient is not equality: the explicit BPTT and ``jax.grad`` of
the same policy's loss round at different places. Both are measured against the float64 computation
of the same problem, and the explicit BPTT's largest relative error must stay within 1.5x of
``jax.grad``'s (``RATIO``), plus a floor of a quarter of the 16-bit unit roundoff for examples where
both are far below rounding level. The errors seen are collected in ``MEASURED``
(``python tests/test_precision.py`` prints the table of the closing note).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bptt_jax as bj
from bptt_jax.core import backward, plan, precision
from bptt_jax.core.params import RNNSpec
from bptt_jax.core.vjp import rnn_states
from tests import reference as ref

RATIO = 1.5
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
MEASURED: dict[tuple[str, str, bool], list[tuple[float, float]]] = {}


def _public(p: ref.Problem, spec: RNNSpec, **kw):
    return bj.bptt(p.params, spec, p.xs, p.targets, weights=p.weights, lengths=p.lengths, h0=p.h0, **kw)


def _grad_of_loss(p: ref.Problem, spec: RNNSpec):
    def f(params, h0):
        return bj.loss(params, spec, p.xs, p.targets, weights=p.weights, lengths=p.lengths, h0=h0)

    h0 = p.h0 if p.h0 is not None else ref.zero_h0(spec, p.xs.shape[1], p.xs.dtype)
    value, (g, dh0) = jax.value_and_grad(f, argnums=(0, 1))(p.params, h0)
    return value, g, dh0


def errors(problem: ref.Problem, compute_dtype: str) -> tuple[float, float]:
    """(explicit BPTT's, jax.grad's) largest relative error against float64, for DIV, the gradients
    and dDIV/dh(-1), computed in ``compute_dtype`` from float32 parameters and inputs."""
    spec = dataclasses.replace(problem.spec, compute_dtype=compute_dtype)
    value, grads, aux = _public(problem, spec)
    chex.assert_trees_all_equal_dtypes(grads, problem.params)  # gradients in the parameters' dtype
    assert value.dtype == jnp.float32
    want_value, want_g, want_dh0 = _grad_of_loss(problem, spec)
    with jax.enable_x64(True):
        p64 = ref.cast(problem, jnp.float64)
        truth = _grad_of_loss(p64, p64.spec)
        ours = ref.max_rel_err((value, grads, aux.dh0), truth)
        theirs = ref.max_rel_err((want_value, want_g, want_dh0), truth)
    key = (problem.spec.cell, compute_dtype, problem.spec.bidirectional)
    MEASURED.setdefault(key, []).append((ours, theirs))
    return ours, theirs


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
@given(problem=ref.problems(cells=("elman", "gru", "lstm"), max_layers=2))
def test_explicit_bptt_is_as_accurate_as_autodiff_under_the_same_policy(compute_dtype, problem):
    ours, theirs = errors(problem, compute_dtype)
    assert np.isfinite(ours) and np.isfinite(theirs)
    bound = RATIO * theirs + UNIT_ROUNDOFF[compute_dtype] / 4
    assert ours <= bound, f"explicit {ours:.3g} vs jax.grad {theirs:.3g}: spec={problem.spec} lengths={problem.lengths}"


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fixed_problem_with_lengths_every_cell(cell, bidirectional):
    """The oracle at one shape per cell and direction, with lengths (the table's rows)."""
    spec = RNNSpec(3, (8, 6), 5, cell=cell, bidirectional=bidirectional)
    p = ref.make_problem(spec, 12, 4, seed=3, use_lengths=True, use_h0=True)
    for cd in ("bfloat16", "float16"):
        ours, theirs = errors(p, cd)
        assert ours <= RATIO * theirs + UNIT_ROUNDOFF[cd] / 4, (cell, bidirectional, cd, ours, theirs)
        assert theirs < 0.1  # the policy computes: not noise


@settings(max_examples=4)
@given(problem=ref.problems(cells=("elman", "gru", "lstm"), max_layers=2), cd=st.sampled_from(["bfloat16", "float16"]))
def test_custom_vjp_is_as_accurate_as_autodiff_under_the_same_policy(problem, cd):
    """``rnn_states`` (the layers' path): its custom VJP against ``grad="autodiff"``, both vs float64."""
    spec = dataclasses.replace(problem.spec, compute_dtype=cd)
    h0 = problem.h0 if problem.h0 is not None else ref.zero_h0(spec, problem.xs.shape[1], jnp.float32)
    probe = ref.on_device(np.random.RandomState(0).randn(*problem.xs.shape[:2], spec.merged_size(-1)), jnp.float32)

    def grads(params, xs, h0, spec, grad):
        def f(params, xs, h0):
            states, last = rnn_states(params, spec, xs, h0=h0, lengths=problem.lengths, return_last=True, grad=grad)
            return jnp.sum(states.astype(probe.dtype) * probe) + sum(
                jnp.sum(jnp.tanh(s)) for s in jax.tree.leaves(last)
            )

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params, xs, h0)  # one program per call

    ours = grads(problem.params, problem.xs, h0, spec, "bptt")
    theirs = grads(problem.params, problem.xs, h0, spec, "autodiff")
    chex.assert_trees_all_equal_dtypes(ours, theirs)
    with jax.enable_x64(True):
        p64 = ref.cast(problem, jnp.float64)
        h64 = jax.tree.map(lambda a: ref.on_device(a, jnp.float64), h0)
        truth = grads(p64.params, p64.xs, h64, p64.spec, "autodiff")
        e_ours, e_theirs = ref.max_rel_err(ours, truth), ref.max_rel_err(theirs, truth)
    assert e_ours <= RATIO * e_theirs + UNIT_ROUNDOFF[cd] / 4, (e_ours, e_theirs)


def test_states_are_stored_in_the_compute_dtype_and_carries_in_float32():
    """What halves the memory: the forward pass the backward reads keeps its states (and a gated
    cell's gates) in bfloat16; the gradient sums and carries it returns are float32."""
    spec = RNNSpec(3, (6,), 4, cell="gru", compute_dtype="bfloat16")
    p = ref.make_problem(spec, 5, 2, seed=1)
    params, xs, h0 = precision.to_compute(spec.compute_dtype, (p.params, p.xs, ref.zero_h0(spec, 2, jnp.float32)))
    pl = plan.Plan(block=5, store=True, segment=None, unroll=1, recurrence="scan")
    traces = backward.run_forward(params, spec, xs, h0, None, pl)
    assert traces[0].states[0].dtype == jnp.bfloat16 and traces[0].caches[0].dtype == jnp.bfloat16
    value, grads, aux = _public(p, spec)
    assert {a.dtype for a in jax.tree.leaves((value, grads, aux.dh0, aux.h_last))} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="gates='store': the gates would be kept in bfloat16"):
        _public(p, spec, gates="store")


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_every_path_rounds_the_inputs_to_the_compute_dtype(cell):
    """X(t) is rounded to the compute dtype on every path: at the entry, or (blocked unidirectional
    stacks) one block at a time inside the scans. Rounding is idempotent, so inputs the caller
    rounded already give the very same DIV, gradients and dDIV/dX; a path that skipped the rounding
    would differ by the inputs' rounding (bfloat16: about 1e-3 relative)."""
    uni = RNNSpec(3, (5, 4), 4, cell=cell, compute_dtype="bfloat16")
    bi = dataclasses.replace(uni, hidden_sizes=(5,), bidirectional=True)
    p = ref.make_problem(uni, 8, 2, seed=3, use_lengths=True)
    xs_r = p.xs.astype(jnp.bfloat16).astype(jnp.float32)
    assert not np.array_equal(np.asarray(xs_r), np.asarray(p.xs))
    for spec, kw in [
        (uni, dict(block_size=2)),
        (uni, dict(block_size=8)),
        (uni, dict(checkpoint_every=4)),
        (bi, dict(block_size=4)),
    ]:
        pb = ref.make_problem(spec, 8, 2, seed=3, use_lengths=True)
        fn = lambda xs, pb=pb, spec=spec, kw=kw: bj.bptt(
            pb.params, spec, xs, pb.targets, lengths=pb.lengths, with_dxs=True, **kw
        )
        # XLA:GPU drops a round trip f32 -> bf16 -> f32 unless told not to ("excess precision"): on
        # an H200 the one-block GRU's dDIV/dWx then used the unrounded X (7.9e-4 apart).
        compiled = jax.jit(fn).lower(p.xs).compile(compiler_options={"xla_allow_excess_precision": False})
        chex.assert_trees_all_close(compiled(p.xs), compiled(xs_r), rtol=0, atol=0)


def test_half_precision_keeps_no_float32_copy_of_the_sequence():
    """What the compute dtype is for: the compiled temp memory of the blocked explicit BPTT in
    bfloat16 well below float32's (XLA:CPU widens 16-bit matmul operands to float32; the scans keep
    that widening per block, ``precision.hide``). Before that the Elman cell took 1.1-1.8x float32's."""
    for cell in ("elman", "gru", "lstm"):
        temps = []
        for cd in (None, "bfloat16"):
            spec = RNNSpec(8, (32,), 8, cell=cell, compute_dtype=cd)
            params = bj.init_params(jax.random.key(0), dataclasses.replace(spec, compute_dtype=None))
            xs = jax.ShapeDtypeStruct((256, 16, 8), jnp.float32)
            d = jax.ShapeDtypeStruct((256, 16), jnp.int32)
            f = jax.jit(lambda p, x, t, spec=spec: bj.bptt(p, spec, x, t, block_size=8)[:2])
            temps.append(f.lower(params, xs, d).compile().memory_analysis().temp_size_in_bytes)
        assert temps[1] < 0.7 * temps[0], (cell, temps)


def test_float32_compute_of_float64_parameters():
    """compute_dtype="float32" computes a float64 network in float32 and returns float64 gradients
    as accurate as float32 (to 1e-4 of the float64 ones here)."""
    with jax.enable_x64(True):
        spec = RNNSpec(3, (5,), 4, cell="lstm")
        p = ref.make_problem(spec, 6, 2, seed=2, dtype=jnp.float64)
        _, g64, _ = _public(p, spec)
        value, g, _ = _public(p, dataclasses.replace(spec, compute_dtype="float32"))
        chex.assert_trees_all_equal_dtypes(g, p.params)
        err = ref.max_rel_err(g, g64)
        assert 0 < err < 1e-4  # rounded to float32: not the float64 computation, and close to it


def test_compute_dtype_is_checked_and_named():
    assert RNNSpec(2, (3,), 2, compute_dtype=jnp.bfloat16).compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"RNNSpec.compute_dtype: unknown value 'int8'"):
        RNNSpec(2, (3,), 2, compute_dtype="int8")
    spec = RNNSpec(2, (3,), 2, compute_dtype="bfloat16")
    p = ref.make_problem(spec, 3, 2, seed=0)
    with pytest.raises(ValueError, match="the kernels compute in float32 or float64, not bfloat16"):
        _public(p, spec, recurrence="pallas")


@pytest.mark.parametrize("kind", ["nnx", "nnx_stack", "equinox"])
def test_layers_take_the_compute_dtype(kind):
    """The NNX and Equinox layers' ``compute_dtype``: float32 weights and carries, outputs (the
    states) in the compute dtype, as ``rnn_states`` returns them; their bfloat16 gradients (the custom VJP) as accurate as ``grad="autodiff"``'s under the same policy,
    both measured against the same layer computed in float32."""
    from flax import nnx

    from bptt_jax.layers import equinox as beqx
    from bptt_jax.layers import nnx as bnnx

    xs = jnp.asarray(np.random.RandomState(4).randn(3, 7, 4), jnp.float32)  # [B, T, N]
    lengths = jnp.array([7, 5, 2])

    def build(cd, grad):
        if kind == "nnx":
            return bnnx.RNN(4, 6, cell="lstm", compute_dtype=cd, grad=grad, rngs=nnx.Rngs(0))
        if kind == "nnx_stack":
            return bnnx.StackedRNN(
                4, (6, 5), cell="gru", bidirectional=True, compute_dtype=cd, grad=grad, rngs=nnx.Rngs(0)
            )
        return beqx.RNN(4, 6, cell="elman", compute_dtype=cd, grad=grad, key=jax.random.key(0))

    def grads(cd, grad):
        layer = build(cd, grad)
        assert layer.spec.compute_dtype == cd
        if kind == "equinox":
            import equinox as eqx

            def loss(m):
                hs, last = m(xs, length=lengths, return_last=True)
                assert (hs.dtype, last.dtype) == (jnp.dtype(cd or jnp.float32), jnp.float32)
                return jnp.sum(jnp.sin(hs)) + jnp.sum(last**2)

            return eqx.filter_jit(eqx.filter_grad(loss))(layer).layer  # one program, not one per operation

        def loss(m):
            carry, ys = m(xs, seq_lengths=lengths, return_carry=True)
            assert {a.dtype for a in jax.tree.leaves(carry)} == {jnp.dtype(jnp.float32)}
            assert ys.dtype == jnp.dtype(cd or jnp.float32)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(a**2) for a in jax.tree.leaves(carry))

        return jax.tree.leaves(nnx.state(nnx.jit(nnx.grad(loss))(layer), nnx.Param))

    truth = grads(None, "autodiff")
    ours, theirs = grads("bfloat16", "bptt"), grads("bfloat16", "autodiff")
    chex.assert_trees_all_equal_dtypes(ours, truth)
    e_ours, e_theirs = ref.max_rel_err(ours, truth), ref.max_rel_err(theirs, truth)
    assert 0 < e_ours <= RATIO * e_theirs + UNIT_ROUNDOFF["bfloat16"] / 4, (e_ours, e_theirs)


if __name__ == "__main__":  # the table of the closing note: errors against float64, medians and worst
    import sys

    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    rng = np.random.RandomState(0)
    for i in range(examples):
        cell = ("elman", "gru", "lstm")[i % 3]
        bidir = bool((i // 3) % 2)
        spec = RNNSpec(3, (8, 6), 5, cell=cell, bidirectional=bidir)
        p = ref.make_problem(spec, 12, 4, seed=int(rng.randint(2**31)), use_lengths=True, use_h0=bool(i % 2))
        for cd in ("bfloat16", "float16"):
            errors(p, cd)
    print(
        "| cell | compute | bidirectional | examples | explicit BPTT err (median, max) | jax.grad err (median, max) | worst ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for (cell, cd, bidir), rows in sorted(MEASURED.items()):
        a = np.array(rows)
        print(
            f"| {cell} | {cd} | {bidir} | {len(a)} | {np.median(a[:, 0]):.2e}, {a[:, 0].max():.2e} | "
            f"{np.median(a[:, 1]):.2e}, {a[:, 1].max():.2e} | {np.max(a[:, 0] / a[:, 1]):.2f} |"
        )
