"""recurrence="native": the gated cells' loops as a compiled CPU kernel (bptt_jax.core.native) equal
jax.grad wherever it runs, and where it cannot be built every entry point says why or keeps the scans."""

import dataclasses
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import bptt_jax as bj
from bptt_jax.core import budget, cells, forward, gradient, kernels, native, plan, tune
from bptt_jax.core.vjp import rnn_states
from tests import reference as ref
from tests.test_cells import GATED, UNROLLS, _check

WHY = native.unavailable()  # builds the kernel (once per test process) where it can be
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"the native kernel cannot run here: {WHY}")
SEGMENTS = st.sampled_from((None, 2, 3))
ROOT = Path(__file__).resolve().parents[1]
T_LONG = 2000


@needs_kernel
class NativeBPTTEqualsAutodiffTest(chex.TestCase):
    """LSTM and GRU stacks (and Elman stacks, below) (1-2 layers, uni/bidirectional, lengths incl. 0 and T, weights, h0 pairs, every
    block-size kind, gates stored or recomputed, checkpoint segments) in float32, with and without an
    outer jit: the kernel's gradients, dh0 and dX against jax.grad (judged against float64 where the
    two float32 paths differ by more than 1e-5)."""

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=4)
    @given(
        problem=ref.problems(cells=GATED, max_layers=2),
        block=ref.BLOCKS,
        unroll=UNROLLS,
        gates=st.sampled_from(("store", "recompute")),
        segment=SEGMENTS,
    )
    def test_float32(self, problem, block, unroll, gates, segment):
        _check(
            problem, jnp.float32, block, segment, variant=self.variant, unroll=unroll, gates=gates, recurrence="native"
        )

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=3)
    @given(problem=ref.problems(cells=("gru",), max_layers=2), block=ref.BLOCKS, segment=SEGMENTS)
    def test_float32_gru_with_v_n_kept(self, problem, block, segment):
        """The GRU's kernel cache with V_n ([r | z | n | V_n], which native.gru_keeps_vn keeps where two
        threads run a step, B 3 N1 N1 > 2^23) at the drawn small shapes: the rule answers True while
        these programs are traced (the answers are counted: traced now, not read from jit's cache)."""
        rule, asked = native.gru_keeps_vn, []
        native.gru_keeps_vn = lambda batch, n1: asked.append((batch, n1)) or True
        try:
            jax.clear_caches()  # bptt's traces of these shapes under the rule in force elsewhere
            _check(problem, jnp.float32, block, segment, variant=self.variant, gates="store", recurrence="native")
        finally:
            native.gru_keeps_vn = rule
            jax.clear_caches()
        assert asked

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=4)
    @given(problem=ref.problems(cells=("elman",), max_layers=2), block=ref.BLOCKS, segment=SEGMENTS)
    def test_float32_elman(self, problem, block, segment):
        """The same for Elman stacks (every f1 the problems draw)."""
        _check(problem, jnp.float32, block, segment, variant=self.variant, recurrence="native")


def _loop_problem(spec: bj.RNNSpec, b: int, t: int = 7):
    """One layer of ``spec`` and, for B = b sequences of T = t steps, its inputs [T, B, N], an entering
    state s0 [B, W], dH_above [T, B, N1], an entering carry [B, W] and valid [T, B] (lengths 7, 3, 0, 1, ...)."""
    layer = bj.init_params(jax.random.key(3), spec).layers[0]
    n1 = spec.hidden_sizes[0]
    w = cells.get(spec.cell).state_width(n1)
    k = jax.random.split(jax.random.key(4), 4)
    xs = jax.random.normal(k[0], (t, b, spec.input_size), jnp.float32)
    s0 = jax.random.normal(k[1], (b, w), jnp.float32)
    above = jax.random.normal(k[2], (t, b, n1), jnp.float32)
    ds_init = jax.random.normal(k[3], (b, w), jnp.float32)
    return layer, xs, s0, above, ds_init, forward.valid_mask(jnp.array([7, 3, 0, 1] * 16)[:b], t)


@needs_kernel
@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize(("b", "n1"), [(4, 5), (1, 37), (11, 40), (48, 9), (32, 300)])
def test_the_kernels_loops_equal_the_scans_step_for_step(name, b, n1):
    """The forward loop's states and gate cache and the reverse call's dA, weight gradients (dWh, and
    the GRU's dbh, summed in the kernel), ds(-1) and norms, with lengths 0 .. T, an h0 and an entering
    carry, against forward.unroll_layer, the cell's reverse and weight_grads. The shapes reach every
    part of the kernel's matmul: B = 1 (its wide tiles), 11 (a full block of rows and a remainder),
    N1 = 5, 37, 40 (whole column panels and a part panel, forward and reverse), B = 48 (the sums'
    chunks: the GRU's of 240 rows, the LSTM's of 5 steps; a full one, then a part), and (32, 300):
    B N1 G N1 >= 2^23 multiply-adds per step, the matmul split over two threads where the process
    may use two cores (the LSTM's sums then after the steps)."""
    cell = cells.get(name)
    layer, xs, s0, above, ds_init, valid = _loop_problem(bj.RNNSpec(3, (n1,), 2, cell=name), b)
    ss, gates = forward.unroll_layer(layer, "tanh", xs, s0, valid, store=True)
    prev = jnp.concatenate([s0[None], ss[:-1]], axis=0)
    das, dvs, ds_m1, norms = cell.reverse(layer, "tanh", xs, prev, ss, above, valid, ds_init, cache=gates)
    kss, kgates = native.forward(name, layer, xs, s0, valid, store=True)
    kss_only = native.forward(name, layer, xs, s0, valid, store=False)
    kgrads, kds_m1, kdas, knorms = native.reverse(name, layer, xs, above, kgates, s0, kss, valid, ds_init)
    wide = n1 > 100  # sums of up to 4 N1 float32 products, in another order than XLA's
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4 if wide else 1e-5, atol=1e-5 if wide else 1e-6)
    close(kss, ss)
    close(kss_only, ss)
    valid_gates = np.asarray(valid)[..., None]  # a padded step's gates are never read
    # the kernel keeps the GRU's [r | z | n] (its reverse forms V_n again; [r | z | n | V_n] where two
    # threads run a step: (32, 300)), the LSTM's [i | f | g | o]
    assert kgates.shape[-1] == native.cache_width(name, b, n1) * n1
    assert kgates.shape[-1] == (4 if name == "lstm" or (b, n1) == (32, 300) else 3) * n1
    close(np.where(valid_gates, kgates, 0), np.where(valid_gates, gates[..., : kgates.shape[-1]], 0))
    close(cell.gate_cache(layer, xs, prev) * valid_gates, gates * valid_gates)
    close(kdas, das)
    if name == "gru":  # the reverse call reads the other caches too: gru.gate_cache's (gates recomputed)
        # with V_n, and the lean one the forward call keeps where asked (keep_vn=False)
        lean = native.forward(name, layer, xs, s0, valid, store=True, keep_vn=False)[1]
        assert lean.shape[-1] == 3 * n1
        for other in (gates, lean):
            vgrads, vds_m1, vdas, vnorms = native.reverse(name, layer, xs, above, other, s0, kss, valid, ds_init)
            close(vdas, das)
            close(vds_m1, ds_m1)
            close(vnorms, norms)
            for k, g in zip(vgrads, kgrads, strict=True):
                close(k, g, rtol=1e-4, atol=1e-5)
    grads = cell.weight_grads(layer, xs, prev, das, dvs)
    for k, g in zip(kgrads, grads, strict=True):
        close(k, g, rtol=1e-4, atol=1e-5)  # summed in the kernel's chunks, another order than XLA's dot
    xgrads, xds_m1, xdas, _ = native.reverse(
        name, layer, xs, above, kgates, s0, kss, valid, ds_init, sum_in_kernel=False
    )
    for k, g in zip(xgrads, grads, strict=True):  # dA (the GRU's dV) returned, summed by XLA
        close(k, g, rtol=1e-4, atol=1e-5)
    close(xds_m1, ds_m1)
    close(xdas, das)
    for batch_major in (False, True):  # the recursion alone (core.sequence), rows time- or batch-major
        rdas, rdvs, rds_m1 = native.reverse_d(
            name, layer.wh, above, kgates, s0, kss, valid, ds_init, batch_major=batch_major, bh=layer.bh
        )
        order = (lambda a: jnp.swapaxes(a, 0, 1)) if batch_major else (lambda a: a)
        close(order(rdas), das)
        close(order(rdvs), dvs)
        close(rds_m1, ds_m1)
    close(kds_m1, ds_m1)
    close(knorms, norms)  # ||dh(t)|| (the LSTM's also ||dc(t)||), padding too
    if native.one_thread(name, b, n1):  # dX on the helper thread too, dA never returned
        dgrads, dds_m1, dxs, dnorms = native.reverse_dx(name, layer, xs, above, kgates, s0, kss, valid, ds_init)
        for k, g in zip(dgrads, grads, strict=True):
            close(k, g, rtol=1e-4, atol=1e-5)
        close(dxs, cell.input_grad(layer, das), rtol=1e-4, atol=1e-5)
        close(dds_m1, ds_m1)
        close(dnorms, norms)


@needs_kernel
@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("b", [16, 8])
def test_the_forward_calls_two_threads(name, b):
    """A per-step matmul on one thread and >= 2^22 multiply-adds in the recurrence and in the
    projection (T = 48, N = N1 = 64; lengths 0 .. T). B = 16: the rows split over two threads, a
    half each for all steps (native.split_rows; X Wx first); B = 8, too few rows to split: with
    kept gates X Wx chunk by chunk beside the steps (chunks of 32 steps, the last a half). Either on
    a helper thread where two cores are free, else on the call's own. The states and gates equal
    forward.unroll_layer's, and the call without kept gates (X Wx step by step)."""
    spec = bj.RNNSpec(64, (64,), 2, cell=name)
    layer, xs, s0, _, _, _ = _loop_problem(spec, b, t=48)
    valid = forward.valid_mask(jnp.array([48, 30, 0, 1, 17, 47, 48, 5] * 2)[:b], 48)
    assert 48 * b * 64 * cells.get(name).GATES * 64 >= 2**22
    assert native.split_rows(name, 48, b, 64) == (b == 16)
    ss, gates = forward.unroll_layer(layer, "tanh", xs, s0, valid, store=True)
    kss, kgates = native.forward(name, layer, xs, s0, valid, store=True)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    close(kss, ss)
    close(native.forward(name, layer, xs, s0, valid, store=False), ss)
    valid_gates = np.asarray(valid)[..., None]
    close(np.where(valid_gates, kgates, 0), np.where(valid_gates, gates[..., : kgates.shape[-1]], 0))
    if b == 16:  # each half of the rows, called alone (8 rows: not split), gives the same bits
        for rows in (slice(0, 8), slice(8, 16)):
            hss, hgates = native.forward(name, layer, xs[:, rows], s0[rows], valid[:, rows], store=True)
            np.testing.assert_array_equal(hss, kss[:, rows])
            np.testing.assert_array_equal(hgates, kgates[:, rows])


@needs_kernel
class SplitForwardEqualsAutodiffTest(chex.TestCase):
    """The whole bptt call where the rules run the kernel on the whole sequence and its forward call
    splits the batch rows (T = 48, B = 16, N = N1 = 64: native.split_rows; the gates kept, or
    recomputed by the reverse pass from the split forward's states), drawn seeds, lengths (0 .. T)
    and h0, with and without an outer jit: loss, gradients, dh0 and dX equal jax.grad's (float32:
    the kernel runs in float32 only; in float64 the rules keep the scans)."""

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=3)
    @given(
        name=st.sampled_from(GATED),
        gates=st.sampled_from(("store", "recompute")),
        seed=st.integers(0, 2**16),
        use_lengths=st.booleans(),
        use_h0=st.booleans(),
    )
    @example(name="lstm", gates="store", seed=2, use_lengths=True, use_h0=True)
    @example(name="gru", gates="recompute", seed=2, use_lengths=True, use_h0=True)
    def test_float32(self, name, gates, seed, use_lengths, use_h0):
        spec = bj.RNNSpec(64, (64,), 8, cell=name)
        p = ref.make_problem(spec, 48, 16, seed=seed, use_lengths=use_lengths, use_h0=use_h0, dtype=jnp.float32)
        assert native.split_rows(name, 48, 16, 64)
        resolved = plan.resolve(plan.Options(gates=gates), spec, 48, 16, jnp.float32, use_cache=False)
        assert resolved.recurrence == "native" and resolved.store == (gates == "store") and resolved.block == 48
        _check(p, jnp.float32, None, None, variant=self.variant, gates=gates, recurrence="native")


@needs_kernel
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_the_elman_forward_call_projects_beside_its_steps(activation):
    """The Elman cell's forward call from X (native.elman_forward_x) with a projection of >= 2^22
    multiply-adds in several chunks (T = 37, B = 16, N = N1 = 128; lengths 0 .. T): X W1 + b1 formed
    chunk by chunk beside the steps, into the states' rows. Equals forward.unroll_layer's states and
    the call given u(t) = X(t) W1 + b1."""
    spec = bj.RNNSpec(128, (128,), 2, activation=activation)
    layer, xs, h0, _, _, _ = _loop_problem(spec, 16, t=37)
    valid = forward.valid_mask(jnp.array([37, 30, 0, 1, 17, 36, 37, 5] * 2), 37)
    assert 37 * 16 * 128 * 128 >= 2**22
    hs = forward.unroll_layer(layer, activation, xs, h0, valid)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    close(native.elman_forward_x(layer, activation, xs, h0, valid), hs)
    close(native.elman_forward(layer.w11, activation, cells.elman.project(layer, xs), h0, valid), hs)


@needs_kernel
@pytest.mark.parametrize(
    ("activation", "b", "n1"),
    [(f, b, n1) for f in sorted(native.ACTIVATIONS) for b, n1 in ((4, 5), (1, 37), (11, 40))] + [("tanh", 32, 520)],
)
def test_the_elman_kernels_loops_equal_the_scans_step_for_step(activation, b, n1):
    """The Elman cell's forward loop (states) and reverse loop (dZ1(t), dDIV/dh(-1), ||dh(t)||), with
    lengths 0 .. T, an h0 and an entering carry, against forward.unroll_layer and
    cells.elman.reverse_recurrence, for every f1; and the reverse call that also sums dW1, dW11, db1
    and makes dX (native.elman_reverse_sums) against cells.elman.weight_grads and input_grad;
    (32, 520): B N1^2 >= 2^23, the two-thread split (the sums after the steps)."""
    layer, xs, h0, above, dh_init, valid = _loop_problem(bj.RNNSpec(3, (n1,), 2, activation=activation), b)
    hs = forward.unroll_layer(layer, activation, xs, h0, valid)
    dz, dh_m1, norms = cells.elman.reverse_recurrence(layer.w11, activation, hs, above, valid, dh_init)
    khs = native.elman_forward(layer.w11, activation, cells.elman.project(layer, xs), h0, valid)
    xhs = native.elman_forward_x(layer, activation, xs, h0, valid)  # X W1 + b1 formed in the call
    kdz, kdh_m1, knorms = native.elman_reverse(layer.w11, activation, khs, above, valid, dh_init)
    bdz, bdh_m1, bnorms = native.elman_reverse(layer.w11, activation, khs, above, valid, dh_init, batch_major=True)
    wide = n1 > 100
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4 if wide else 1e-5, atol=1e-5 if wide else 1e-6)
    close(khs, hs)
    close(xhs, hs)
    close(kdz, dz)
    close(kdh_m1, dh_m1)
    close(knorms, norms)
    close(jnp.swapaxes(bdz, 0, 1), dz)  # dZ1's rows written batch-major [B, C, N1]
    close(bdh_m1, dh_m1)
    close(bnorms, norms)
    # the same call with the weight-gradient sums and dX on its helper thread
    sums, sdh_m1, sdx, snorms = native.elman_reverse_sums(
        layer, activation, xs, h0, khs, above, valid, dh_init, dx=True
    )
    want = cells.elman.weight_grads(layer, xs, jnp.concatenate([h0[None], hs[:-1]]), dz, dz)
    for got, ref_ in zip(sums, want, strict=True):  # sums over all rows, in another order: atol by their size
        np.testing.assert_allclose(got, ref_, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(ref_))))
    close(sdx, cells.elman.input_grad(layer, dz))
    close(sdh_m1, dh_m1)
    close(snorms, norms)


@needs_kernel
@pytest.mark.parametrize("name", native.CELLS)
def test_rnn_states_and_vmap_with_the_kernel(name):
    """rnn_states' custom VJP with the kernel = jax.grad of the scans (bidirectional stack, lengths,
    h0 (the LSTM's pairs)), also under vmap (the kernel runs once per example there)."""
    spec = bj.RNNSpec(3, (4, 3), 2, cell=name, bidirectional=True)
    p = ref.make_problem(spec, 5, 2, seed=8, use_lengths=True, use_h0=True)
    ct = jnp.asarray(np.random.RandomState(0).randn(5, 2, 6), jnp.float32)

    def states(recurrence):
        return lambda params, xs, h0: jnp.sum(
            rnn_states(params, spec, xs, h0=h0, lengths=p.lengths, recurrence=recurrence) * ct
        )

    got = jax.grad(states("native"), argnums=(0, 1, 2))(p.params, p.xs, p.h0)
    want = jax.grad(states("scan"), argnums=(0, 1, 2))(p.params, p.xs, p.h0)
    assert ref.max_rel_err(got, want) < 1e-5

    def one(xs):  # [T, N] -> the loss of one example, through the kernel
        return jnp.sum(rnn_states(p.params, spec, xs[:, None], recurrence="native") ** 2)

    per_example = jax.vmap(jax.grad(one), in_axes=1, out_axes=1)(p.xs)
    plain = jnp.stack([jax.grad(one)(p.xs[:, i]) for i in range(p.xs.shape[1])], axis=1)
    np.testing.assert_allclose(per_example, plain, rtol=1e-5, atol=1e-6)


def _sums_cases(test):
    """SumsInTheKernelTest's cases for one cell: with and without jit, three drawn (seed, uni- or
    bidirectional, 1-2 layers) and two explicit two-layer stacks (dX made in the kernel for the layer
    below)."""
    test = example(seed=2, bidirectional=False, two_layers=True)(test)
    test = example(seed=1, bidirectional=True, two_layers=True)(test)
    test = given(seed=st.integers(0, 2**16), bidirectional=st.booleans(), two_layers=st.booleans())(test)
    return chex.variants(with_jit=True, without_jit=True)(settings(max_examples=3)(test))


@needs_kernel
class SumsInTheKernelTest(chex.TestCase):
    """Stacks of each cell (the gated ones with their gates kept) whose whole-sequence block has C B >=
    native.KERNEL_SUM_ROWS rows, where the reverse call makes the weight-gradient sums itself
    (native.sums_in_kernel; here on a helper thread beside the steps, in chunks of 32 steps,
    whichever thread takes them; the GRU's dV in a ring of 4 chunks): bptt's gradients and dDIV/dh(-1) against jax.grad of the loss through the
    scans, in float32 (the kernel is float32 only), with lengths (0 .. T) and h0, uni- and
    bidirectional, 1-2 layers (the upper one's dX made in the kernel, over dH_above), with and
    without an outer jit; and the same call in blocks of 16 steps (XLA sums dA and dV) agrees."""

    def _check(self, cell, seed, bidirectional, two_layers):
        t, b = 160, 8  # C B = 1280 >= native.KERNEL_SUM_ROWS; chunks of 32 steps: 5 (the GRU's ring of 4 wraps)
        # two layers: the upper one's input as wide as its states, so its dX takes dH_above's buffer
        sizes = ((4, 8) if bidirectional else (5, 5)) if two_layers else (5,)
        spec = bj.RNNSpec(3, sizes, 2, cell=cell, bidirectional=bidirectional)
        assert native.sums_in_kernel(cell, t * b, b, 5, True)
        p = ref.make_problem(spec, t, b, seed=seed, use_lengths=True, use_h0=True)

        def loss(params, h0):
            return bj.loss(params, spec, p.xs, p.targets, lengths=p.lengths, h0=h0, recurrence="scan")

        want = jax.grad(loss, argnums=(0, 1))(p.params, p.h0)

        def run(params, h0, **kw):
            _, grads, aux = bj.bptt(params, spec, p.xs, p.targets, lengths=p.lengths, h0=h0, recurrence="native", **kw)
            return grads, aux.dh0

        got = self.variant(functools.partial(run, **({} if cell == "elman" else {"gates": "store"})))(p.params, p.h0)
        blocks = self.variant(functools.partial(run, block_size=16))(p.params, p.h0)
        chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
        assert ref.max_rel_err(got, want) < 1e-4
        assert ref.max_rel_err(blocks, want) < 1e-4

    @_sums_cases
    def test_gru(self, seed, bidirectional, two_layers):
        self._check("gru", seed, bidirectional, two_layers)

    @_sums_cases
    def test_lstm(self, seed, bidirectional, two_layers):
        self._check("lstm", seed, bidirectional, two_layers)

    @_sums_cases
    def test_elman(self, seed, bidirectional, two_layers):
        self._check("elman", seed, bidirectional, two_layers)


@needs_kernel
def test_loss_and_forward_keep_the_scans_and_stay_differentiable():
    """jax cannot differentiate the FFI call: loss and forward with recurrence="native" run the scans
    (jax.grad of loss works and equals bptt's explicit gradient through the kernel)."""
    spec = bj.RNNSpec(3, (4,), 2, cell="lstm")
    p = ref.make_problem(spec, 6, 3, seed=1, use_lengths=True)
    g = jax.grad(bj.loss)(p.params, spec, p.xs, p.targets, lengths=p.lengths, recurrence="native")
    _, g_native, _ = bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, recurrence="native")
    assert ref.max_rel_err(g_native, g) < 1e-5
    out = bj.forward(p.params, spec, p.xs, lengths=p.lengths, recurrence="native")
    chex.assert_trees_all_close(out.hs, bj.forward(p.params, spec, p.xs, lengths=p.lengths).hs)


@needs_kernel
@pytest.mark.parametrize(("name", "bidirectional"), [("lstm", False), ("lstm", True), ("gru", True)])
def test_the_kernels_norms_equal_the_scans(name, bidirectional):
    """diagnostics=True: ||dDIV/dh(t)|| (and the LSTM's ||dDIV/dc(t)||) from the kernel's reverse loop
    equal the scans' (lengths with 0 and T: the padded steps' norms of the carry too), two layers."""
    spec = bj.RNNSpec(3, (4, 5), 2, cell=name, bidirectional=bidirectional)
    p = ref.make_problem(spec, 7, 4, seed=5, use_lengths=True, use_h0=True)
    p = dataclasses.replace(p, lengths=jnp.array([7, 0, 3, 1]))
    runs = [
        bj.bptt(p.params, spec, p.xs, p.targets, lengths=p.lengths, h0=p.h0, diagnostics=True, recurrence=r)[2]
        for r in ("native", "scan")
    ]
    chex.assert_trees_all_close(runs[0].dh_norms, runs[1].dh_norms, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(runs[0].dc_norms, runs[1].dc_norms, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_tune_times_the_kernel_beside_the_scans():
    """An LSTM in float32 on the CPU: the rules choose the kernel with the whole sequence as one
    block (``plan.NATIVE_WHOLE_ELEMENTS``); tune times it first, the kernel in the scans' time blocks
    next, and the scans' own plans (their rules' blocks among them) after; float64 and a fixed
    recurrence get no kernel plan. The Elman cell's rules choose the kernel up to N1 =
    ``kernels.NATIVE_ELMAN_MAX_HIDDEN`` and the scans above, the kernel's plans next."""
    spec = bj.RNNSpec(3, (4,), 2, cell="lstm")
    asked = plan.Options()

    def candidates(asked, spec=spec, dtype=jnp.float32):
        default = plan.explicit(asked, spec, T_LONG, 64, dtype)
        scans = tune._scans_plan(asked, default, spec, T_LONG, 64, dtype)
        return tune._candidates(default, default, asked, spec, T_LONG, 64, dtype, None, True, False, scans=scans)

    cands = candidates(asked)
    default = cands[0]
    assert (default.recurrence, default.block_size, default.gates) == ("native", T_LONG, "store")
    scans = plan.explicit(plan.Options(recurrence="scan"), spec, T_LONG, 64, jnp.float32)
    assert scans.block_size < T_LONG and scans in cands  # the rules cut the scans' sequence into blocks
    assert cands[1] == dataclasses.replace(scans, recurrence="native"), cands  # measured second
    natives = [o for o in cands if o.recurrence == "native"]
    assert natives == cands[:2] and all(dataclasses.replace(o, recurrence="scan") in cands for o in natives)
    assert not any(o.recurrence == "native" for o in candidates(plan.Options(recurrence="scan")))
    assert not any(o.recurrence == "native" for o in candidates(asked, dtype=jnp.float64))
    elman = bj.RNNSpec(3, (4,), 2)  # N1 up to kernels.NATIVE_ELMAN_MAX_HIDDEN: the kernel first
    elman_cands = candidates(asked, spec=elman)
    assert elman_cands[0].recurrence == "native", elman_cands
    assert dataclasses.replace(elman_cands[0], recurrence="scan") in elman_cands
    wide = bj.RNNSpec(3, (kernels.NATIVE_ELMAN_MAX_HIDDEN + 1,), 2)  # wider: the scans, the kernel next
    elman_cands = candidates(asked, spec=wide)
    elman_natives = [o for o in elman_cands if o.recurrence == "native"]
    assert elman_cands[0].recurrence == "scan" and len(elman_natives) >= 1, elman_cands
    assert elman_natives == elman_cands[1 : 1 + len(elman_natives)]
    assert elman_natives[0] == dataclasses.replace(elman_cands[0], recurrence="native")
    gru = bj.RNNSpec(3, (4,), 2, cell="gru")
    assert candidates(asked, spec=gru)[0].recurrence == "native"


def test_without_the_kernel_an_explicit_choice_says_why_and_auto_keeps_the_scans(monkeypatch):
    """The fallback: where the kernel cannot be built, recurrence="native" raises with the reason,
    "auto" keeps the scans with a warning that says why, tune keeps the scans, and a cached
    "native" plan is not taken (the rules choose)."""
    monkeypatch.setattr(native, "unavailable", lambda: "no C++ compiler (g++, or $CXX) on PATH")
    spec = bj.RNNSpec(3, (4,), 2, cell="lstm")
    p = ref.make_problem(spec, 5, 2, seed=3)
    with pytest.raises(ValueError, match=r"recurrence='native': no C\+\+ compiler .* use recurrence='scan'"):
        bj.bptt(p.params, spec, p.xs, p.targets, recurrence="native")
    with pytest.warns(UserWarning, match=r"kernel cannot run \(no C\+\+ compiler .*\); the lstm runs its scans"):
        assert kernels.resolve("auto", (4,), jnp.float32, cell="lstm") == "scan"
    tuned = {"block_size": 5, "gates": "store", "unroll": 1, "recurrence": "native"}
    filled = plan.fill_tuned(plan.Options(), tuned, spec, 5, 2, jnp.float32)
    assert filled.recurrence == "auto" and filled.block_size == 5
    with pytest.warns(UserWarning, match="runs its scans"):
        default = plan.explicit(plan.Options(), spec, 5, 2, jnp.float32)
        cands = tune._candidates(default, default, plan.Options(), spec, 5, 2, jnp.float32, None, True, False)
    assert all(o.recurrence == "scan" for o in cands)


@pytest.mark.parametrize(
    ("cxx", "message"),
    [("no-such-compiler-here", r"no C\+\+ compiler"), ("false", r"compiling cell_kernels.cc failed")],
)
def test_a_build_that_cannot_run_or_fails_gives_its_reason(monkeypatch, tmp_path, cxx, message):
    """native._compile with no compiler, and with one that fails: the reason, no library left behind."""
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path))
    why = native._compile()
    assert isinstance(why, str), why
    assert __import__("re").search(message, why), why
    assert not list(tmp_path.rglob("*.so*"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: native.elman_forward(jnp.eye(2), "softplus", jnp.ones((1, 1, 2)), jnp.ones((1, 2)), None), "knows"),
        (lambda: kernels.resolve("native", (4,), jnp.float16, cell="gru"), "computes in float32, not float16"),
        (lambda: kernels.resolve("native", (4,), jnp.float64, cell="lstm"), "computes in float32, not float64"),
        (lambda: kernels.resolve("native", (4,), jnp.float32, cell="lstm", backend="gpu"), "runs on the CPU"),
    ],
)
def test_what_the_kernel_cannot_do_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@needs_kernel
def test_the_elman_calls_with_the_projection_and_sums_refuse_inconsistent_shapes():
    """The kernel's own checks behind the library's (which never pass such arrays): an X whose width
    is not W1's, and an X of another length than the states, fail with the call's name, not a crash."""
    layer, xs, h0, above, dh_init, valid = _loop_problem(bj.RNNSpec(3, (5,), 2), 4)
    hs = native.elman_forward_x(layer, "tanh", xs, h0, valid)
    with pytest.raises(Exception, match="elman forward: inconsistent shapes"):
        native.elman_forward_x(layer, "tanh", xs[..., :2], h0, valid)
    with pytest.raises(Exception, match="elman reverse: inconsistent shapes"):
        native.elman_reverse_sums(layer, "tanh", xs[:-1], h0, hs, above, valid, dh_init, dx=True)


@needs_kernel
def test_tune_under_a_budget_only_the_kernels_plans_meet(tmp_path, monkeypatch):
    """Under a budget that no scan plan meets but a kernel plan does, tune returns a kernel plan
    (not "no plan fits"), bptt(max_memory=...) then runs it, and its gradient equals the scans'.
    An Elman cell wider than ``kernels.NATIVE_ELMAN_MAX_HIDDEN``: its rules keep the scans (narrower
    ones and the gated cells' rules choose the kernel themselves)."""
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path))
    spec = bj.RNNSpec(4, (kernels.NATIVE_ELMAN_MAX_HIDDEN + 1,), 4)
    p = ref.make_problem(spec, 8, 2, seed=2)
    args = (p.params, p.xs, p.targets, None, None, None, None)

    def temp(o):
        fn = jax.jit(functools.partial(gradient._bptt, spec=spec, options=o))
        return budget.temp_bytes(fn.lower(*args).compile())

    rules = plan.explicit(plan.Options(), spec, 8, 2, jnp.float32)
    assert rules.recurrence == "scan", rules
    plans = budget.candidates(rules, spec, 8, 2, True)
    lean = min(temp(dataclasses.replace(o, recurrence="native")) for o in plans)
    assert lean < min(temp(o) for o in plans)  # the kernel's loops keep no scan buffers
    with pytest.raises(ValueError, match="no plan of this gradient fits"):
        bj.bptt(p.params, spec, p.xs, p.targets, max_memory=lean)  # the rules' candidates: scans only
    chosen = bj.tune(p.params, spec, p.xs, p.targets, max_memory=lean, time_budget=5, progress=False)
    assert chosen.recurrence == "native", chosen
    gradient._within_budget.cache_clear()
    got = bj.bptt(p.params, spec, p.xs, p.targets, max_memory=lean)
    want = bj.bptt(p.params, spec, p.xs, p.targets, recurrence="scan")
    assert ref.max_rel_err(got[:2], want[:2]) < 1e-5


@needs_kernel
@pytest.mark.parametrize("name", GATED)
def test_the_layers_with_the_kernel_equal_their_scans(name):
    """The Equinox layer (a batch in one call and jax.vmap over one-sequence calls, lengths) and the
    NNX layer (from Flax's cell) with recurrence="native": the gradients of their scans' layers."""
    import equinox as eqx
    from flax import nnx

    from bptt_jax.layers import equinox as beqx
    from bptt_jax.layers import nnx as bnnx

    xs = jax.random.normal(jax.random.key(2), (3, 6, 4))
    length = jnp.array([6, 2, 0])
    make = {"gru": eqx.nn.GRUCell, "lstm": eqx.nn.LSTMCell}[name]
    cell = make(4, 5, key=jax.random.key(1))
    layers = {r: beqx.RNN.from_eqx_cell(cell, recurrence=r) for r in ("scan", "native")}
    batch = lambda m: jnp.sum(jnp.sin(m(xs, length=length)))  # noqa: E731
    mapped = lambda m: jnp.sum(jnp.sin(jax.vmap(lambda x, n: m(x, length=n))(xs, length)))  # noqa: E731
    for loss in (batch, mapped):
        got, want = (eqx.filter_grad(loss)(layers[r]) for r in ("native", "scan"))
        assert ref.max_rel_err(got.layer, want.layer) < 1e-5
    flax_cell = {"gru": nnx.GRUCell, "lstm": nnx.OptimizedLSTMCell}[name](4, 5, rngs=nnx.Rngs(0))
    grads = {}
    for r in ("scan", "native"):
        layer = bnnx.RNN.from_flax_cell(flax_cell, recurrence=r)
        grads[r] = nnx.grad(lambda m: jnp.sum(jnp.sin(m(xs, seq_lengths=length))))(layer)
    assert ref.max_rel_err(dict(grads["native"]), dict(grads["scan"])) < 1e-5


@needs_kernel
def test_auto_runs_the_kernel_on_a_batch_and_the_scans_per_sequence():
    """The Equinox layer's defaults: its batch call runs the compiled kernel (the gated cells'
    rule), a one-sequence call under jax.vmap (gates recomputed: rnn_states) runs the scans, since
    jax.vmap would run the kernel once per sequence; both give the scans' gradient."""
    import equinox as eqx

    from bptt_jax.layers import equinox as beqx

    xs = jax.random.normal(jax.random.key(2), (3, 6, 4))
    auto = beqx.RNN(4, 5, cell="lstm", gates="recompute", key=jax.random.key(1))
    scans = beqx.RNN(4, 5, cell="lstm", gates="recompute", recurrence="scan", key=jax.random.key(1))
    batch = lambda m: jnp.sum(jnp.sin(m(xs)))  # noqa: E731
    mapped = lambda m: jnp.sum(jnp.sin(jax.vmap(m)(xs)))  # noqa: E731
    for loss, kernel in ((batch, True), (mapped, False)):
        program = str(jax.make_jaxpr(eqx.filter_grad(loss))(auto))
        assert ("bptt_jax_lstm_forward" in program) == kernel, (loss, kernel)
        got, want = (eqx.filter_grad(loss)(m) for m in (auto, scans))
        assert ref.max_rel_err(got.layer, want.layer) < 1e-5


@needs_kernel
@pytest.mark.parametrize("name", native.CELLS)
def test_the_equinox_layer_vmapped_runs_one_kernel_call_for_the_batch(name):
    """The Equinox layer called on one sequence under jax.vmap runs ONE forward and ONE reverse
    kernel call for the whole vmapped batch: under jax.grad of the vmapped loss its batch call
    (custom_vmap rule), under jax.vmap of jax.grad (per-example gradients) core.sequence's loops
    (their custom_vmap rules), with the scans' gradients: jax.grad of the vmapped loss (lengths,
    h0, the final state), per-example gradients, an ensemble (weights vmapped too),
    jax.checkpoint, a nested vmap, and a vjp taken outside the vmap and vmapped over cotangents."""
    import equinox as eqx

    from bptt_jax.layers import equinox as beqx

    t_len, b, n, n1 = 6, 3, 4, 5
    xs = jax.random.normal(jax.random.key(2), (b, t_len, n))
    length = jnp.array([6, 2, 0])
    h0 = 0.5 * jax.random.normal(jax.random.key(3), (b, n1))
    h0 = (h0, -h0) if name == "lstm" else h0
    layers = {r: beqx.RNN(n, n1, cell=name, recurrence=r, key=jax.random.key(1)) for r in ("native", "scan")}
    last_h = (lambda s: s[0]) if name == "lstm" else (lambda s: s)

    def loss(m, xs, h0):
        hs, last = jax.vmap(lambda x, h, k: m(x, h, length=k, return_last=True))(xs, h0, length)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(last_h(last) ** 2)

    program = str(jax.make_jaxpr(eqx.filter_grad(loss))(layers["native"], xs, h0))
    assert program.count(f"bptt_jax_{name}_forward") == 1 and program.count(f"bptt_jax_{name}_reverse") == 1
    assert f"f32[{t_len},{b},{n1}]" in program  # the calls' rows: all B sequences, time-major

    def same(f, tol=1e-5):  # each side jitted: one program, not one per operation
        got, want = eqx.filter_jit(f)(layers["native"]), eqx.filter_jit(f)(layers["scan"])
        assert ref.max_rel_err(got, want) < tol

    same(lambda m: eqx.filter_grad(loss)(m, xs, h0).layer)
    same(lambda m: jax.grad(loss, argnums=(1, 2))(m, xs, h0))
    per_example = lambda m: jax.vmap(lambda x: eqx.filter_grad(lambda m: jnp.sum(jnp.sin(m(x))))(m).layer)(xs)  # noqa: E731
    program = str(jax.make_jaxpr(per_example)(layers["native"]))
    assert program.count(f"bptt_jax_{name}_forward") == 1 and program.count(f"bptt_jax_{name}_reverse") == 1
    same(per_example)
    same(lambda m: eqx.filter_grad(lambda m: jnp.sum(jnp.cos(jax.vmap(jax.checkpoint(lambda x: m(x)))(xs))))(m).layer)
    same(lambda m: eqx.filter_grad(lambda m: jnp.sum(jnp.cos(jax.vmap(jax.vmap(m))(jnp.stack([xs, -xs])))))(m).layer)
    out, vjp = jax.vjp(layers["native"], xs[0])
    want = jax.vjp(layers["scan"], xs[0])[1]
    cts = jax.random.normal(jax.random.key(4), (2, *out.shape))
    assert ref.max_rel_err(jax.vmap(vjp)(cts), jax.vmap(want)(cts)) < 1e-5
    keys = jax.random.split(jax.random.key(5), 2)
    ensembles = {
        r: eqx.filter_vmap(lambda k, r=r: beqx.RNN(n, n1, cell=name, recurrence=r, key=k))(keys)
        for r in ("native", "scan")
    }
    ens_loss = lambda e: jnp.sum(jnp.sin(eqx.filter_vmap(lambda m, x: m(x))(e, xs[:2])))  # noqa: E731
    got, want = (eqx.filter_grad(ens_loss)(ensembles[r]).layer for r in ("native", "scan"))
    assert ref.max_rel_err(got, want) < 1e-5


@needs_kernel
class EquinoxVmappedEqualsAutodiffTest(chex.TestCase):
    """Property: the Equinox layer called on one sequence under jax.vmap (the kernel's paths in
    float32: the batch call under jax.grad, core.sequence's custom_vmap loops under jax.vmap of
    jax.grad; the scans in float64) equals jax.grad of the same layer with grad="autodiff" (the
    forward scan differentiated): weights, inputs and initial states, drawn cells, lengths 0 .. T,
    with and without h0, both orders of the transformations."""

    @settings(max_examples=6)
    @given(
        name=st.sampled_from(native.CELLS),
        seed=st.integers(0, 2**16),
        per_example=st.booleans(),
        with_h0=st.booleans(),
        dtype=st.sampled_from(("float32", "float64")),
    )
    def test_vmapped_layer(self, name, seed, per_example, with_h0, dtype):
        import equinox as eqx

        from bptt_jax.layers import equinox as beqx

        t_len, b, n, n1 = 5, 3, 4, 5
        with jax.enable_x64(dtype == "float64"):
            f = jnp.dtype(dtype)
            keys = jax.random.split(jax.random.key(seed), 4)
            kind = {"recurrence": "native"} if name == "elman" and dtype == "float32" else {}
            ours = beqx.RNN(n, n1, cell=name, dtype=f, key=keys[0], **kind)
            oracle = beqx.RNN(n, n1, cell=name, dtype=f, grad="autodiff", key=keys[0])
            xs = jax.random.normal(keys[1], (b, t_len, n), f)
            lengths = jax.random.randint(keys[2], (b,), 0, t_len + 1).at[0].set(t_len)
            h = 0.5 * jax.random.normal(keys[3], (b, n1), f)
            h0 = ((h, -h) if name == "lstm" else h) if with_h0 else None
            last_h = (lambda s: s[0]) if name == "lstm" else (lambda s: s)

            def one(m, x, k, h):
                hs, last = m(x, h, length=k, return_last=True)
                return jnp.sum(jnp.sin(hs)) + jnp.sum(last_h(last) ** 2)

            def grads(m):
                if per_example:  # jax.vmap of jax.grad: each sequence's own gradients
                    g = lambda x, k, h: eqx.filter_grad(one)(m, x, k, h).layer  # noqa: E731
                    return jax.vmap(g)(xs, lengths, h0)
                loss = lambda m, x, h: jnp.sum(jax.vmap(lambda x, k, h: one(m, x, k, h))(x, lengths, h))  # noqa: E731
                return eqx.filter_grad(loss)(m, xs, h0).layer, jax.grad(loss, argnums=(1, 2))(m, xs, h0)

            tol = 1e-10 if dtype == "float64" else 1e-5
            assert ref.max_rel_err(eqx.filter_jit(grads)(ours), eqx.filter_jit(grads)(oracle)) < tol


def test_vmap_innermost_sees_where_jax_vmap_traces_the_call():
    """core.sequence._vmap_innermost is True only where jax.vmap is the transformation tracing the
    call and batches its input (jax.grad of a vmapped loss, a vmapped call under jit), never where
    jax.grad is inside the vmap (custom_vmap has no reverse-mode rule) or without a vmap. The
    Equinox layer's vmapped call runs its batch call exactly where it is True (its speed rests on
    that; the gradients are checked in both cases above)."""
    from bptt_jax.core import sequence

    seen = []

    def f(x):
        seen.append(sequence._vmap_innermost(x))
        return x

    ones = jnp.ones((2, 3))
    jax.vmap(f)(ones)
    jax.grad(lambda x: jnp.sum(jax.vmap(f)(x)))(ones)
    jax.jit(jax.vmap(f))(ones)
    jax.vmap(jax.grad(lambda x: jnp.sum(f(x))))(ones)
    f(ones)
    jax.jit(f)(ones)
    jax.vmap(lambda y: f(ones))(ones)  # vmapped, but not the input
    assert seen == [True, True, True, False, False, False, False]


def test_the_layers_name_a_recurrence_they_do_not_know():
    from flax import nnx

    from bptt_jax.layers import equinox as beqx
    from bptt_jax.layers import nnx as bnnx

    with pytest.raises(ValueError, match="recurrence: expected one of"):
        beqx.RNN(3, 4, cell="gru", recurrence="nativ", key=jax.random.key(0))
    with pytest.raises(ValueError, match="recurrence: expected one of"):
        bnnx.RNN(3, 4, cell="lstm", recurrence="kernel", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="recurrence: expected one of"):
        bnnx.StackedRNN(3, (4, 4), cell="lstm", recurrence="kernel", rngs=nnx.Rngs(0))


def _has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@needs_kernel
@pytest.mark.skipif(not _has_avx2_fma(), reason="the processor has no AVX2 and FMA to run an AVX2 build")
def test_the_kernel_built_for_avx2_equals_the_scans(tmp_path):
    """The kernel compiled for AVX2 (-march=haswell: 8-float vectors, 6-row tiles, the build an AVX2
    machine makes) where this processor can run it: the step-for-step tests in a process of its own
    (a process registers one build of the kernel), its build in a cache of its own."""
    script = (
        "import sys, pytest\n"
        "from bptt_jax.core import native\n"
        "native.FLAGS = tuple('-march=haswell' if f == '-march=native' else f for f in native.FLAGS)\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:xdist', 'tests/test_native.py', "
        "'-k', 'step_for_step']))\n"
    )
    env = {**os.environ, "BPTT_JAX_CACHE_DIR": str(tmp_path), "BPTT_JAX_TEST_PLAN_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "23 passed" in done.stdout, done.stdout[-3000:]
    (built,) = (tmp_path / "native").glob("cell_kernels-*.so")
    if shutil.which("objdump") is not None:  # no AVX-512 register in the AVX2 build
        listing = subprocess.run(["objdump", "-d", str(built)], capture_output=True, text=True).stdout
        assert "%zmm" not in listing


@needs_kernel
@pytest.mark.parametrize(
    ("name", "bidirectional", "every"),
    [
        ("lstm", True, 6),
        ("gru", True, (12, 4)),
        ("lstm", False, 4),
        ("gru", False, 6),
        ("elman", True, 6),
        ("elman", False, 4),
    ],
)
def test_checkpoint_segments_run_the_kernel_in_whole_segments(name, bidirectional, every):
    """With the kernel and checkpoint segments whose gates are kept (a bidirectional stack's always,
    a unidirectional one's by the rules for k steps), the block inside a segment is the whole
    innermost segment (plan.segment_block, as the kernel's whole-sequence rule for k steps), where
    it was the rules' block for T (blocks of 32 ran 1.44x slower at T = 20,000); a bidirectional
    Elman stack's too (no gates; blocks of 64 ran 1.45x slower); elsewhere the rules' block.
    Gradients, dh0 and dX: jax.grad's (float32; lengths 0..T, h0)."""
    spec = bj.RNNSpec(3, (8, 8), 4, cell=name, bidirectional=bidirectional)
    p = ref.make_problem(spec, 24, 3, seed=5, use_lengths=True, use_h0=True, dtype=jnp.float32)
    k = plan.segment_levels(every)[-1]
    resolved = plan.resolve(plan.Options(checkpoint_every=every), spec, 24, 3, jnp.float32, use_cache=False)
    kept = bidirectional or plan.resolve_gates("auto", spec, k, 3, None, jnp.float32)
    assert resolved.recurrence == "native"
    assert resolved.block == (k if kept else min(plan.auto_block_size(24, 3, plan.block_width(spec)), k))
    _check(p, jnp.float32, None, every, recurrence="native")
    first = plan.explicit(plan.Options(), spec, 24, 3, jnp.float32)
    segmented = [o for o in budget.candidates(first, spec, 24, 3, True) if o.checkpoint_every is not None]
    assert segmented  # the budget's segment candidates take the same rule
    for o in segmented:
        assert o.block_size == plan.segment_block(spec, o.checkpoint_every, 3, "native", first.block_size)
    if name == "elman":  # the rule where the rules' block is below the segment (T = 20,000, B 16: 64)
        wide = bj.RNNSpec(64, (128,), 64, bidirectional=bidirectional)
        assert plan.segment_block(wide, 2000, 16, "native", 64) == (2000 if bidirectional else 64)
        assert plan.segment_block(wide, 2000, 16, "scan", 64) == 64
        assert plan.segment_block(wide, 2**14, 16, "native", 64) == 64  # above plan.NATIVE_WHOLE_ELEMENTS


def test_the_elman_kernels_block_holds_the_rows_its_sums_need():
    """The Elman cell's rules (the kernel up to N1 = kernels.NATIVE_ELMAN_MAX_HIDDEN) raise the
    scans' time block to the nearest divisor of T with at least native.KERNEL_SUM_ROWS rows (up to
    twice as many), so that the reverse call sums the weight gradients itself; elsewhere the scans'
    block stays. bptt's plan and the layers' (vjp._block) agree. Plan resolution only (no compile)."""
    from bptt_jax.core import vjp

    def blocks(t, b, n1, cell="elman"):
        spec = bj.RNNSpec(4, (n1,), 4, cell=cell)
        rules = plan.resolve(plan.Options(), spec, t, b, jnp.float32, use_cache=False)
        scans = plan.resolve(plan.Options(recurrence="scan"), spec, t, b, jnp.float32, use_cache=False)
        layer = vjp._block(spec, ("auto", None, None), t, b, plan.block_width(spec), rules.recurrence)
        assert layer == rules.block, (layer, rules)
        return rules.recurrence, rules.block, scans.block

    assert plan.elman_kernel_block(bj.RNNSpec(4, (128,), 4), 1000, 16, 50) == 100
    if WHY is None:  # the rules run the kernel where it builds
        rec, c, c_scans = blocks(1000, 16, 128)
        assert (rec, c_scans, c) == ("native", 50, 100) and native.sums_in_kernel("elman", c * 16, 16, 128, True)
        assert blocks(200, 64, 256)[1:] == (20, 8)
        assert blocks(128, 32, 256)[1:] == (128, 128)  # the whole sequence already
    assert blocks(100, 64, 512) == ("scan", 10, 10)  # wider than the rule: the scans
    spec = bj.RNNSpec(4, (128,), 4)
    assert plan.elman_kernel_block(spec, 1000, 1024, 2) == 2  # a matmul of two threads: no sums to gain
    assert plan.elman_kernel_block(spec, 1000, 16, 64) == 64  # rows enough already
    assert plan.elman_kernel_block(spec, 997, 16, 50) == 50  # T prime: no divisor, the block given


@settings(max_examples=25)
@given(
    t_len=st.integers(1, 3000),
    batch=st.integers(1, 300),
    block=st.integers(1, 3000),
    n1=st.sampled_from((8, 128, 256, 1024)),
)
def test_the_elman_kernel_block_rule_holds_its_invariants(t_len, batch, block, n1):
    """plan.elman_kernel_block over drawn T, B, blocks and widths: the block given where it already
    holds native.KERNEL_SUM_ROWS rows, where the per-step matmul has two threads, or where no divisor
    of T lies in [need, 2 need]; otherwise the smallest such divisor (need = rows / B, rounded up)."""
    spec = bj.RNNSpec(4, (n1,), 4)
    block = min(block, t_len)
    got = plan.elman_kernel_block(spec, t_len, batch, block)
    need = -(-native.KERNEL_SUM_ROWS // batch)
    divisors = [c for c in range(need, min(2 * need, t_len) + 1) if t_len % c == 0]
    if block >= need or not native.one_thread("elman", batch, n1) or not divisors:
        assert got == block
    else:
        assert got == divisors[0] and t_len % got == 0 and got * batch >= native.KERNEL_SUM_ROWS
        assert got <= 2 * need and got > block


@needs_kernel
@settings(max_examples=3)
@given(seed=st.integers(0, 2**16), use_lengths=st.booleans(), use_h0=st.booleans())
def test_the_elman_rules_plan_with_raised_blocks_equals_autodiff(seed, use_lengths, use_h0):
    """The Elman cell at a shape whose rules raise the block (T 640, B 8, N1 256: the scans' 64
    steps, the kernel's 128, so that its reverse calls sum in the kernel): bptt's loss, gradients,
    dh0 and dX equal jax.grad's (float32; drawn seeds, lengths 0..T and h0)."""
    spec = bj.RNNSpec(4, (256,), 4)
    assert plan.resolve(plan.Options(), spec, 640, 8, jnp.float32, use_cache=False).block == 128
    p = ref.make_problem(spec, 640, 8, seed=seed, use_lengths=use_lengths, use_h0=use_h0)
    _check(p, jnp.float32)


@needs_kernel
@pytest.mark.parametrize(("t_len", "batch", "n1", "kernel_width"), [(64, 8, 32, 3), (4, 64, 210, 4)])
def test_the_grus_kernel_cache_and_the_memory_bound_that_counts_it(t_len, batch, n1, kernel_width):
    """The GRU's kernel keeps [r | z | n] per step (3 N1; its reverse call forms V_n = h(t-1) W_hn + b_hn
    again, a chunk of steps in one matmul) where its per-step matmul has one thread (T 64, B 8, N1 32),
    [r | z | n | V_n] where it has two (B 3 N1 N1 > 2^23: B 64, N1 210; native.gru_keeps_vn), the scans
    always [r | z | n | V_n] (4 N1): budget.stored_bytes, the shape-read lower bound of a plan's temp
    memory, counts each, each compiled bptt call (float32, the gates stored, one block) keeps at least
    that much, and the kernel's gradient equals jax.grad's."""
    spec = bj.RNNSpec(4, (n1,), 4, cell="gru")
    assert native.gru_keeps_vn(batch, n1) == (kernel_width == 4)
    p = ref.make_problem(spec, t_len, batch, seed=0, use_lengths=True, dtype=jnp.float32)
    want = jax.grad(bj.loss)(p.params, spec, p.xs, p.targets, lengths=p.lengths, recurrence="scan")
    for recurrence, width in (("native", kernel_width), ("scan", 4)):
        asked = plan.Options(recurrence=recurrence, gates="store", block_size=t_len)
        options = plan.explicit(asked, spec, t_len, batch, jnp.float32)
        assert (options.recurrence, options.gates, options.block_size) == (recurrence, "store", t_len)
        lower = budget.stored_bytes(options, spec, t_len, batch, jnp.float32)
        assert lower == t_len * batch * (1 + width) * n1 * 4  # the states h(t) and the gate cache
        fn = jax.jit(functools.partial(gradient._bptt, spec=spec, options=options))
        compiled = fn.lower(p.params, p.xs, p.targets, None, p.lengths, None, None).compile()
        assert budget.temp_bytes(compiled) >= lower, (recurrence, budget.temp_bytes(compiled), lower)
        _, got, _ = compiled(p.params, p.xs, p.targets, None, p.lengths, None, None)
        assert ref.max_rel_err(got, want) < 1e-4, recurrence


@needs_kernel
def test_the_lstms_kernel_keeps_h_and_c_apart():
    """The LSTM's forward call writes h(t) and c(t) to two buffers (native.forward(..., apart=True))
    and the stack reads them as their join [h | c]: XLA folds every slice of the join back into the
    two buffers -- the next layer's input h(t), the reverse call's operands, the final states -- so
    the compiled program of a 2-layer stack (float32, the gates stored, one block; and in checkpoint
    segments) holds no [T, B, 2 N1] array at all, where h(t) cut out of an interleaved [h | c] was
    one copy per layer; and the gradient equals jax.grad's. The forward call's two layouts hold the
    same numbers."""
    t_len, batch, n1 = 16, 4, 24
    spec = bj.RNNSpec(5, (n1, n1), 7, cell="lstm")
    p = ref.make_problem(spec, t_len, batch, seed=1, use_lengths=True, dtype=jnp.float32)
    want = jax.grad(bj.loss)(p.params, spec, p.xs, p.targets, lengths=p.lengths, recurrence="scan")
    joined = f"f32[{t_len},{batch},{2 * n1}]"
    for segments in (None, 4):
        options = plan.Options(recurrence="native", gates="auto" if segments else "store", checkpoint_every=segments)
        fn = jax.jit(functools.partial(gradient._bptt, spec=spec, options=options))
        compiled = fn.lower(p.params, p.xs, p.targets, None, p.lengths, None, None).compile()
        assert joined not in compiled.as_text(), segments
        _, got, _ = compiled(p.params, p.xs, p.targets, None, p.lengths, None, None)
        assert ref.max_rel_err(got, want) < 1e-4, segments
    layer = p.params.layers[0]
    h0 = jnp.full((batch, 2 * n1), 0.1, jnp.float32)
    ss, cache = native.forward("lstm", layer, p.xs, h0, None, store=True)
    (hs, cs), cache_apart = native.forward("lstm", layer, p.xs, h0, None, store=True, apart=True)
    np.testing.assert_array_equal(ss, jnp.concatenate([hs, cs], axis=-1))
    np.testing.assert_array_equal(cache, cache_apart)
    d_hs = jax.random.normal(jax.random.PRNGKey(2), hs.shape, jnp.float32)
    joined_d = native.reverse_d("lstm", layer.wh, d_hs, cache, h0, ss, None, None)
    apart_d = native.reverse_d("lstm", layer.wh, d_hs, cache, h0, cs, None, None)  # c(t) alone
    for a, b in zip(joined_d, apart_d):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="apart"):
        native.forward("gru", layer, p.xs, h0, None, store=True, apart=True)
