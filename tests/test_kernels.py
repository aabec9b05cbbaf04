"""The Pallas kernels (interpret mode on the CPU) equal the scans; bptt with them equals jax.grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bptt_jax as bj
from bptt_jax.core import forward, kernels
from bptt_jax.core.cells import elman
from bptt_jax.core.params import LayerParams
from tests import reference as ref


@st.composite
def recurrences(draw):
    t_len = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 4))
    n1 = draw(st.integers(1, 6))
    act = draw(st.sampled_from(ref.ACTIVATIONS))
    use_lengths = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return t_len, batch, n1, act, use_lengths, seed


def _arrays(t_len, batch, n1, use_lengths, seed, dtype):
    rng = np.random.RandomState(seed)
    f = lambda *s: ref.on_device(rng.randn(*s), dtype)
    lengths = None
    if use_lengths:
        lens = rng.randint(0, t_len + 1, size=batch)
        lens[rng.randint(batch)] = t_len  # lengths 0 and T both occur across examples
        lengths = ref.on_device(lens, jnp.int32)
    return f(n1, n1) * 0.5, f(t_len, batch, n1), f(batch, n1), f(t_len, batch, n1), f(batch, n1), lengths


def _skip_where_refused(hidden_sizes, dtype):
    """On a GPU the public calls refuse the kernels outside their dtypes and sizes (on the CPU they
    always run, in interpret mode): such a case is skipped there, with the library's reason."""
    reason = kernels.unsupported_reason(hidden_sizes, dtype)
    if reason is not None:
        pytest.skip(f"recurrence='pallas' refused on {jax.default_backend()}: {reason}")


class KernelsEqualScansTest(chex.TestCase):
    def _check(self, case, dtype, tol):
        t_len, batch, n1, act, use_lengths, seed = case
        w11, us, h0, above, dh_init, lengths = _arrays(t_len, batch, n1, use_lengths, seed, dtype)
        valid = forward.valid_mask(lengths, t_len)
        layer = LayerParams(jnp.eye(n1, dtype=dtype), w11, jnp.zeros(n1, dtype))
        want_hs = forward.unroll_layer(layer, act, us, h0, valid)
        got_hs = self.variant(lambda u, h: kernels.forward_recurrence(w11, act, u, h, valid))(us, h0)
        self.assertLess(ref.max_rel_err(got_hs, want_hs), tol)
        want = elman.reverse_recurrence(w11, act, want_hs, above, valid, dh_init)
        got = self.variant(lambda a, d: kernels.reverse_recurrence(w11, act, want_hs, a, valid, d))(above, dh_init)
        self.assertLess(ref.max_rel_err(got, want), tol)  # dZ1(t), dh(-1) and the norms of dh(t)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=8)  # interpret mode is slow; the ci profile's other settings still apply
    @given(case=recurrences())
    def test_float64(self, case):
        with jax.enable_x64(True):
            self._check(case, jnp.float64, 1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=8)
    @given(case=recurrences())
    def test_float32(self, case):
        self._check(case, jnp.float32, 1e-6)


def test_grad_through_the_forward_kernel_equals_grad_through_the_scan():
    """The forward kernel's custom VJP (the reverse kernel) equals autodiff of the scan."""
    with jax.enable_x64(True):
        w11, us, h0, _, _, lengths = _arrays(5, 3, 4, True, 3, jnp.float64)
        valid = forward.valid_mask(lengths, 5)
        for act in ref.ACTIVATIONS:
            via_kernel = lambda w, u, h, act=act: jnp.sum(jnp.sin(kernels.forward_recurrence(w, act, u, h, valid)))
            via_scan = lambda w, u, h, act=act: jnp.sum(
                jnp.sin(forward.unroll_layer(LayerParams(jnp.eye(4), w, jnp.zeros(4)), act, u, h, valid))
            )
            got = jax.grad(via_kernel, argnums=(0, 1, 2))(w11, us, h0)
            want = jax.grad(via_scan, argnums=(0, 1, 2))(w11, us, h0)
            assert ref.max_rel_err(got, want) < 1e-12, act


class BPTTWithKernelsTest(chex.TestCase):
    """bptt(..., recurrence="pallas") on stacks, bidirectional with lengths, against jax.grad of loss."""

    def _check(self, p, dtype, tol):
        _skip_where_refused(p.spec.hidden_sizes, dtype)
        p = ref.cast(p, dtype)
        kw = dict(weights=p.weights, lengths=p.lengths, h0=p.h0)
        value, grads, aux = self.variant(
            lambda params, xs: bj.bptt(
                params, p.spec, xs, p.targets, recurrence="pallas", with_dxs=True, diagnostics=True, **kw
            )
        )(p.params, p.xs)
        h0 = p.h0 if p.h0 is not None else tuple(jnp.zeros((p.xs.shape[1], n1), dtype) for n1 in p.spec.state_sizes())
        f = lambda params, h0, xs: bj.loss(
            params, p.spec, xs, p.targets, weights=p.weights, lengths=p.lengths, h0=h0, recurrence="scan"
        )
        want_v, (want_g, want_dh0, want_dxs) = jax.value_and_grad(f, argnums=(0, 1, 2))(p.params, h0, p.xs)
        err = ref.max_rel_err((value, grads, aux.dh0, aux.dxs), (want_v, want_g, want_dh0, want_dxs))
        self.assertLess(err, tol)
        scan_norms = bj.bptt(p.params, p.spec, p.xs, p.targets, recurrence="scan", diagnostics=True, **kw)[2].dh_norms
        self.assertLess(ref.max_rel_err(aux.dh_norms, scan_norms), tol)

    @chex.variants(with_jit=True, without_jit=True)
    @settings(max_examples=6)
    @given(problem=ref.problems(bidirectional=True, lengths=True, max_layers=2, max_t=4))
    def test_bidirectional_float64(self, problem):
        with jax.enable_x64(True):
            self._check(problem, jnp.float64, 1e-10)

    @chex.variants(without_jit=True)
    @settings(max_examples=6)
    @given(problem=ref.problems(bidirectional=False, max_layers=2, max_t=4))
    def test_unidirectional_float32(self, problem):
        self._check(problem, jnp.float32, 1e-5)


def test_loss_with_kernels_is_differentiable_and_equal():
    spec = bj.RNNSpec(3, (4, 2), 5, bidirectional=True)
    p = ref.make_problem(spec, 5, 2, seed=9, use_lengths=True)
    # float64 where the kernels take it (everywhere on the CPU); float32 on a GPU that refuses float64
    f64 = kernels.unsupported_reason((4, 2), jnp.float64) is None
    dtype, tol, fwd_tol = (jnp.float64, 1e-10, 1e-12) if f64 else (jnp.float32, 1e-5, 1e-6)
    with jax.enable_x64(dtype == jnp.float64):
        p = ref.cast(p, dtype)
        f = lambda rec: jax.value_and_grad(
            lambda q: bj.loss(q, spec, p.xs, p.targets, lengths=p.lengths, recurrence=rec)
        )(p.params)
        assert ref.max_rel_err(f("pallas"), f("scan")) < tol
        fwd = bj.forward(p.params, spec, p.xs, lengths=p.lengths, recurrence="pallas")
        assert ref.max_rel_err(fwd, bj.forward(p.params, spec, p.xs, lengths=p.lengths, recurrence="scan")) < fwd_tol


def test_resolve(monkeypatch):
    """The decision pinned by the H100 run of benchmarks/gpu_check.py (benchmarks/README.md): on a GPU
    "auto" takes the kernels for float32 layers of N1 <= 64 (measured faster than the scans) and the
    scans for N1 = 128 (measured slower, though the kernels run there on request)."""
    assert kernels.GPU_AUTO and kernels.AUTO_MAX_HIDDEN_GPU == 64
    # on the CPU "auto" takes the compiled kernel for Elman layers up to NATIVE_ELMAN_MAX_HIDDEN
    # (where it builds; test_native.py checks that choice), the scans above and in float64
    wide = (kernels.NATIVE_ELMAN_MAX_HIDDEN + 1,)
    assert kernels.resolve("auto", (64, wide[0]), jnp.float32, backend="cpu") == "scan"
    assert kernels.resolve("auto", (64,), jnp.float64, backend="cpu") == "scan"
    assert kernels.resolve("pallas", (4096,), jnp.float64, backend="cpu") == "pallas"  # interpret mode
    assert kernels.resolve("auto", (64,), jnp.float32, backend="gpu") == "pallas"
    assert kernels.resolve("auto", (32, 64), jnp.float32, backend="gpu") == "pallas"
    assert kernels.resolve("auto", (64, 128), jnp.float32, backend="gpu") == "scan"  # measured slower at 128
    assert kernels.resolve("pallas", (128,), jnp.float32, backend="gpu") == "pallas"  # on request
    assert kernels.resolve("auto", (1024,), jnp.float32, backend="gpu") == "scan"  # W11 too large: falls back
    assert kernels.resolve("auto", (64,), jnp.float64, backend="gpu") == "scan"
    assert kernels.resolve("scan", (64,), jnp.float32, backend="gpu") == "scan"
    monkeypatch.setattr(kernels, "GPU_AUTO", False)
    assert kernels.resolve("auto", (64,), jnp.float32, backend="gpu") == "scan"


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ("pallas", (1024,), jnp.float32, "gpu"),
            r"recurrence='pallas': W11 of a layer with N1=1024 needs 4096 KiB of on-chip memory, more than the 64 KiB "
            r"the kernels allow; use recurrence='scan' \(or 'auto', which falls back\)",
        ),
        (
            ("pallas", (64,), jnp.float64, "gpu"),
            r"recurrence='pallas': dtype float64 is not supported by the GPU kernels \(only float32\)",
        ),
        (("pallas", (64,), jnp.float32, "tpu"), r"recurrence='pallas': no Pallas kernel for backend 'tpu'"),
        (
            ("fast", (64,), jnp.float32, "cpu"),
            r"recurrence: expected one of \['scan', 'pallas', 'native', 'auto'\], got 'fast'",
        ),
    ],
)
def test_resolve_errors(args, message):
    with pytest.raises(ValueError, match=message):
        kernels.resolve(*args[:3], backend=args[3])


def test_bad_recurrence_named_by_the_public_calls():
    spec = bj.RNNSpec(3, (4,), 5)
    p = ref.make_problem(spec, 3, 2, seed=0)
    with pytest.raises(ValueError, match=r"recurrence: expected one of"):
        bj.bptt(p.params, spec, p.xs, p.targets, recurrence="fast")
    with pytest.raises(ValueError, match=r"recurrence: expected one of"):
        bj.loss(p.params, spec, p.xs, p.targets, recurrence="fast")
