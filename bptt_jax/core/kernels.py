"""Pallas kernels for the two recurrences, each one launch for all T.

The forward recurrence (the input projection u(t) = X(t) W1 + b1 is formed outside, for all t)::

    h = h0
    for t in range(T):
        h_new = f1(u[t] + h @ W11)
        h = h_new if valid[t] else h                   # padding holds the state
        hs[t] = h

The reverse recurrence (BPTT of one layer, ``cells.elman.reverse_recurrence``)::

    carry = dh_init                                    # dZ1(T) W11^T
    for t in reversed(range(T)):
        dh = dh_above[t] + carry                       # dh(t)
        dz1[t] = dh * f1'(hs[t]) if valid[t] else 0
        norms[t] = ||dh||                              # per sequence
        carry = dz1[t] @ W11^T if valid[t] else dh     # padding passes dh through
    dh_m1 = carry                                      # dDIV/dh(-1)

Each program instance owns a tile of the batch: it loads W11 (W11^T) once, keeps h (the dh carry)
in registers / on-chip memory across the time loop and streams u(t), dH_above(t), h(t) in and h(t),
dZ1(t) out. On a GPU this replaces ``lax.scan``'s loop of small kernel launches, one per step, by a
single launch. On a CPU the same kernels run in Pallas's interpret mode (slow, exact): that is how
CI tests them. Sizes are padded to powers of two (at least 16, as Triton's block shapes and dots
need); padded rows and columns carry zeros and are cut off again.

``resolve`` decides between the kernels and the scans (``recurrence="scan" | "pallas" | "auto"``).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from bptt_jax.core import activations, native, precision

Array = jax.Array

RECURRENCES = ("scan", "pallas", "native", "auto")
# On-chip memory a program may give to W11 on a GPU. An H100 SM has 228 KiB of shared memory;
# W11 in float32 must leave room for the streamed tiles, so N1 <= 128 (64 KiB) qualifies.
MAX_ONCHIP_BYTES = 64 * 1024
BATCH_TILE = 16  # rows of the batch per program
# Whether "auto" picks the kernels on a GPU. Switched on after the kernels were compiled by Triton and
# passed tests/test_kernels.py and the BPTT = jax.grad tests on an H100 (2026-11-26, docs/results/benchmarks.md,
# "On a GPU"). "auto" takes them only where they were measured faster than the scans: every layer
# N1 <= AUTO_MAX_HIDDEN_GPU (T = 500, B = 1, 16, 64: 1.3-4.4x the best scan, unroll 8 included, at
# N1 = 32 and 64; 0.08-0.35x at N1 = 128, where W11 no longer sits well in a program's registers).
# recurrence="pallas" selects them up to the on-chip budget regardless.
GPU_AUTO = True
AUTO_MAX_HIDDEN_GPU = 64
# The cells whose explicit BPTT "auto" runs with the cells' compiled CPU kernel (``native``) where it
# can run (float32 on the CPU, built): measured on a 2-core Xeon with AVX-512 (2026-12-05,
# benchmarks/results/native_blocks_spr.md), the whole bptt call with the kernel and the whole
# sequence as one block (``plan.NATIVE_WHOLE_ELEMENTS``) ran 1.13-1.44x the scans' default plan
# at the gated benchmark shapes (LSTM; GRU 1.00-1.36x, 1.10-1.43x in a first run). The Elman cell
# runs it where every layer has N1 <= NATIVE_ELMAN_MAX_HIDDEN: measured on a 2-core Xeon of family
# 6, model 207 (2026-12-06, benchmarks/results/native_kernel_elman_s23_emr.md,
# native_blocks_elman_*_s23_emr.md, nnx_speed_elman_s23_emr.md), one layer's forward + backward ran
# 1.09-1.86x the scans' up to N1 = 256, the whole bptt call 1.00-1.14x in the scans' blocks at
# 0.60-0.95x their temp memory (1.17-1.23x in the blocks of ``plan.elman_kernel_block``), and a
# Flax NNX model's training step 1.72x at 0.54x the memory; one layer at (100, 128, 512, 1024) 0.97x
# and the call at (100, 64, 256, 512, 256) 0.92-1.01x, so wider layers keep the scans.
NATIVE_AUTO_CELLS = ("elman", "gru", "lstm")
NATIVE_ELMAN_MAX_HIDDEN = 256
KERNEL_DTYPES_GPU = ("float32",)


def _pow2(n: int, least: int = 16) -> int:
    p = least
    while p < n:
        p *= 2
    return p


def unsupported_reason(hidden_sizes, dtype, backend: str | None = None) -> str | None:
    """Why the kernels cannot run here, or None when they can.

    On the CPU they always can (interpret mode). On a GPU W11 must fit in on-chip memory
    (N1^2 * itemsize <= MAX_ONCHIP_BYTES) and the dtype must be float32. Other backends have no
    kernel.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return None
    if backend != "gpu":
        return f"no Pallas kernel for backend {backend!r} (only gpu, and cpu in interpret mode)"
    name = jnp.dtype(dtype).name
    if name not in KERNEL_DTYPES_GPU:
        return f"dtype {name} is not supported by the GPU kernels (only {', '.join(KERNEL_DTYPES_GPU)})"
    for n1 in hidden_sizes:
        need = _pow2(n1) ** 2 * jnp.dtype(dtype).itemsize
        if need > MAX_ONCHIP_BYTES:
            return (
                f"W11 of a layer with N1={n1} needs {need // 1024} KiB of on-chip memory, more than the "
                f"{MAX_ONCHIP_BYTES // 1024} KiB the kernels allow"
            )
    return None


def native_reason(cell: str, dtype, backend: str | None = None) -> str | None:
    """Why ``recurrence="native"`` (the cells' compiled kernel, ``bptt_jax.core.native``) cannot
    run here, or None: it holds the Elman cell, the LSTM and the GRU in float32 on the CPU, where it
    could be built."""
    if cell not in native.CELLS:
        return f"the compiled kernel holds the cells {list(native.CELLS)}, got cell={cell!r}"
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return f"the compiled kernel runs on the CPU, not {backend!r}"
    if jnp.dtype(dtype).name != "float32":
        return f"the compiled kernel computes in float32, not {jnp.dtype(dtype).name}"
    return native.unavailable()


def _native_auto(cell: str, hidden_sizes) -> bool:
    """Whether "auto" takes the compiled kernel for this cell and these layers where it can run
    (``NATIVE_AUTO_CELLS``; the Elman cell up to ``NATIVE_ELMAN_MAX_HIDDEN``)."""
    if cell not in NATIVE_AUTO_CELLS:
        return False
    return cell != "elman" or max(hidden_sizes) <= NATIVE_ELMAN_MAX_HIDDEN


def check_recurrence(recurrence: str) -> str:
    """``recurrence`` itself when it names one of ``RECURRENCES``; ValueError otherwise."""
    if recurrence not in RECURRENCES:
        raise ValueError(f"recurrence: expected one of {list(RECURRENCES)}, got {recurrence!r}")
    return recurrence


def resolve(
    recurrence: str,
    hidden_sizes,
    dtype,
    backend: str | None = None,
    cell: str = "elman",
    differentiable: bool = False,
) -> str:
    """ "scan", "pallas" or "native" for a requested ``recurrence``.

    "auto" picks the Pallas kernels on a GPU where they apply and were measured faster (float32,
    every N1 <= ``AUTO_MAX_HIDDEN_GPU``; ``GPU_AUTO``), the cells' compiled kernel for the cells of
    ``NATIVE_AUTO_CELLS`` (the Elman cell's layers up to ``NATIVE_ELMAN_MAX_HIDDEN``) where it can
    run (``native_reason``: float32 on the CPU, built; the first
    such call builds it), and the scans everywhere else; "pallas" on a CPU runs the Pallas kernels
    in interpret mode; "native" is the compiled kernel; an explicit choice that cannot apply raises
    ValueError. ``differentiable``: a path that ``jax.grad`` differentiates (``loss``, ``forward``,
    grad="autodiff"), where "native" and "auto" run the scans (jax cannot differentiate the FFI call).
    """
    check_recurrence(recurrence)
    backend = backend or jax.default_backend()
    if recurrence == "scan":
        return "scan"
    if recurrence == "native":
        if differentiable:
            return "scan"
        why = native_reason(cell, dtype, backend)
        if why is not None:
            raise ValueError(f"recurrence='native': {why}; use recurrence='scan' (or 'auto', which falls back)")
        return "native"
    if recurrence == "auto" and _native_auto(cell, hidden_sizes) and not differentiable and backend == "cpu":
        why = native_reason(cell, dtype, backend)
        if why is None:
            return "native"
        if jnp.dtype(dtype).name == "float32":  # it would have run: say once why it does not
            warnings.warn(f"bptt_jax: the compiled kernel cannot run ({why}); the {cell} runs its scans", stacklevel=2)
    if cell != "elman":  # the Pallas kernels hold the Elman recurrence; gated cells run their scans
        if recurrence == "pallas":
            raise ValueError(
                f"recurrence='pallas': the kernels are the Elman cell's, got cell={cell!r}; use 'scan' or 'auto'"
            )
        return "scan"
    reason = unsupported_reason(hidden_sizes, dtype, backend)
    if precision.is_half(dtype):  # the kernels know no mixed-precision policy
        reason = f"the kernels compute in float32 or float64, not {jnp.dtype(dtype).name} (compute_dtype)"
    if recurrence == "auto":
        faster = max(hidden_sizes) <= AUTO_MAX_HIDDEN_GPU
        return "pallas" if GPU_AUTO and backend == "gpu" and reason is None and faster else "scan"
    if reason is not None:
        raise ValueError(f"recurrence='pallas': {reason}; use recurrence='scan' (or 'auto', which falls back)")
    return "pallas"


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _pad_to(a: Array, shape) -> Array:
    pads = [(0, s - d) for s, d in zip(shape, a.shape)]
    return jnp.pad(a, pads) if any(p[1] for p in pads) else a


def _dot(a, b):
    return jnp.dot(a, b, precision=lax.Precision.HIGHEST)


def _forward_kernel(u_ref, w_ref, h0_ref, v_ref, hs_ref, *, f, t_len):
    w = w_ref[...]  # [N1p, N1p], loaded once

    def body(t, h):
        h_new = f(u_ref[t] + _dot(h, w))  # [Bt, N1p]
        h_new = jnp.where(v_ref[t][:, None] > 0, h_new, h)
        hs_ref[t] = h_new
        return h_new

    lax.fori_loop(0, t_len, body, h0_ref[...])


def _reverse_kernel(a_ref, hs_ref, wt_ref, dhi_ref, v_ref, dz_ref, dhm1_ref, nrm_ref, *, df, t_len):
    wt = wt_ref[...]  # [N1p, N1p] W11^T, loaded once

    def body(i, carry):
        t = t_len - 1 - i
        dh = a_ref[t] + carry  # [Bt, N1p]
        keep = v_ref[t][:, None] > 0
        dz = jnp.where(keep, dh * df(hs_ref[t]), 0.0)
        dz_ref[t] = dz
        nrm_ref[t] = jnp.sqrt(jnp.sum(dh * dh, axis=-1))
        return jnp.where(keep, _dot(dz, wt), dh)

    dhm1_ref[...] = lax.fori_loop(0, t_len, body, dhi_ref[...])


def _compiler_params(num_warps):
    """Triton's warps per program, or None for Pallas's default (interpret mode takes none)."""
    if num_warps is None or _interpret():
        return None
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=num_warps)


def _shapes(t_len, batch, n1):
    return _pow2(t_len, 1), _pow2(batch, BATCH_TILE), _pow2(n1)


def _call_forward(w11, activation, us, h0, valid, num_warps=None):
    from jax.experimental import pallas as pl

    t_len, batch, n1 = us.shape
    tp, bp, np_ = _shapes(t_len, batch, n1)
    bt = BATCH_TILE
    kernel = functools.partial(_forward_kernel, f=activations.hidden(activation).f, t_len=t_len)
    hs = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tp, bp, np_), us.dtype),
        grid=(bp // bt,),
        in_specs=[
            pl.BlockSpec((tp, bt, np_), lambda i: (0, i, 0)),
            pl.BlockSpec((np_, np_), lambda i: (0, 0)),
            pl.BlockSpec((bt, np_), lambda i: (i, 0)),
            pl.BlockSpec((tp, bt), lambda i: (0, i)),
        ],
        out_specs=pl.BlockSpec((tp, bt, np_), lambda i: (0, i, 0)),
        interpret=_interpret(),
        compiler_params=_compiler_params(num_warps),
    )(
        _pad_to(us, (tp, bp, np_)),
        _pad_to(w11, (np_, np_)),
        _pad_to(h0, (bp, np_)),
        _pad_to(valid.astype(us.dtype), (tp, bp)),
    )
    return hs[:t_len, :batch, :n1]


def _call_reverse(w11, activation, hs, dhs_above, valid, dh_init, num_warps=None):
    from jax.experimental import pallas as pl

    t_len, batch, n1 = hs.shape
    tp, bp, np_ = _shapes(t_len, batch, n1)
    bt = BATCH_TILE
    kernel = functools.partial(_reverse_kernel, df=activations.hidden(activation).df_from_h, t_len=t_len)
    dz, dh_m1, norms = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((tp, bp, np_), hs.dtype),
            jax.ShapeDtypeStruct((bp, np_), hs.dtype),
            jax.ShapeDtypeStruct((tp, bp), hs.dtype),
        ),
        grid=(bp // bt,),
        in_specs=[
            pl.BlockSpec((tp, bt, np_), lambda i: (0, i, 0)),
            pl.BlockSpec((tp, bt, np_), lambda i: (0, i, 0)),
            pl.BlockSpec((np_, np_), lambda i: (0, 0)),
            pl.BlockSpec((bt, np_), lambda i: (i, 0)),
            pl.BlockSpec((tp, bt), lambda i: (0, i)),
        ],
        out_specs=(
            pl.BlockSpec((tp, bt, np_), lambda i: (0, i, 0)),
            pl.BlockSpec((bt, np_), lambda i: (i, 0)),
            pl.BlockSpec((tp, bt), lambda i: (0, i)),
        ),
        interpret=_interpret(),
        compiler_params=_compiler_params(num_warps),
    )(
        _pad_to(dhs_above, (tp, bp, np_)),
        _pad_to(hs, (tp, bp, np_)),
        _pad_to(w11.T, (np_, np_)),
        _pad_to(dh_init, (bp, np_)),
        _pad_to(valid.astype(hs.dtype), (tp, bp)),
    )
    return dz[:t_len, :batch, :n1], dh_m1[:batch, :n1], norms[:t_len, :batch]


def _valid_or_ones(valid, t_len, batch):
    return jnp.ones((t_len, batch), bool) if valid is None else valid


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _forward(w11, activation, us, h0, valid):
    return _call_forward(w11, activation, us, h0, valid)


def _forward_fwd(w11, activation, us, h0, valid):
    hs = _call_forward(w11, activation, us, h0, valid)
    return hs, (w11, h0, valid, hs)


def _forward_bwd(activation, res, dhs):
    """The VJP of the forward recurrence is the reverse recurrence: BPTT of one layer."""
    w11, h0, valid, hs = res
    dz1s, dh_m1, _ = _call_reverse(w11, activation, hs, dhs, valid, jnp.zeros_like(h0))
    hs_tm1 = jnp.concatenate([h0[None], hs[:-1]], axis=0)  # [T, B, N1] h(t-1)
    dw11 = hs_tm1.reshape(-1, hs.shape[-1]).T @ dz1s.reshape(-1, hs.shape[-1])
    return dw11, dz1s, dh_m1, None


_forward.defvjp(_forward_fwd, _forward_bwd)


def forward_recurrence(w11: Array, activation: str, us: Array, h0: Array, valid: Array | None) -> Array:
    """hs [T, B, N1] of the forward recurrence (module docstring), one kernel launch.

    Args:
      w11: [N1, N1]; activation: f1's name; us: [T, B, N1] u(t) = X(t) W1 + b1; h0: [B, N1];
      valid: [T, B] booleans or None (all valid).

    Differentiable by ``jax.grad``: its VJP runs ``reverse_recurrence``.
    """
    return _forward(w11, activation, us, h0, _valid_or_ones(valid, *us.shape[:2]))


def reverse_recurrence(
    w11: Array, activation: str, hs: Array, dhs_above: Array, valid: Array | None, dh_init: Array | None = None
):
    """(dz1s [T, B, N1], dh_m1 [B, N1], dh_norm [T, B]) of the reverse recurrence, one kernel launch.

    Args as ``cells.elman.reverse_recurrence``: hs [T, B, N1] the states, dhs_above [T, B, N1], valid [T, B] or
    None, dh_init [B, N1] the carry entering from beyond T-1 (zeros when None).
    """
    dh_init = jnp.zeros_like(hs[0]) if dh_init is None else dh_init
    return _call_reverse(w11, activation, hs, dhs_above, _valid_or_ones(valid, *hs.shape[:2]), dh_init)
