"""The cells' two loops as a compiled CPU kernel: ``recurrence="native"``.

``cell_kernels.cc`` (beside this file) writes the Elman cell's, the LSTM's and the GRU's forward
step loops and reverse recursions (the loops ``cells.elman.reverse_recurrence``,
``cells.lstm.reverse`` and ``cells.gru.reverse`` state, the notes' BPTT of these cells) as XLA FFI
handlers: one call runs all C steps of a time block, per step one matmul (h(t-1) W11 or h(t-1) Wh
forward, dZ1(t) W11^T or dV(t) Wh^T in reverse; the file's own, with the recurrent weights packed
once per call for all C steps, split over two threads from 2^23 multiply-adds per step where the
process may use two cores) and one fused pass over the batch rows for f1 or the gate arithmetic,
where XLA:CPU runs several separate operations per step. The gated cells' forward call also forms
A = X Wx + bx itself: with the gates kept, for all C steps into the gate cache's own buffer (no
[C, B, G N1] array of pre-activations beside the cache; where the per-step matmul has one thread,
chunk by chunk on a helper thread ahead of the steps), else step by step; the reverse call writes
the LSTM's dA(t) over its gate cache (``input_output_aliases``). For long blocks
(``sums_in_kernel``) the reverse call also makes weight-gradient sums: the GRU's dWh and dbh (its
dV then never becomes an array), and where the per-step matmul has one thread the LSTM's dWx, dWh
and the biases', the GRU's dWx and dbx too, and dX = dA Wx^T for the layer below (``reverse_dx``;
the GRU's dA then never an array either), on a helper thread, chunk by chunk as the steps finish
them: beside the recursion, on the second core; the Elman cell's reverse call does the same for
dW1, dW11, db1 and dX where its per-step matmul has one thread (``elman_reverse_sums``; dX is
written over dH_above's buffer wherever the two have one shape, for every cell), and its forward
call forms X W1 + b1 itself into the states' rows (``elman_forward_x``). The gates' recomputation
with gates="recompute", the other weight-gradient sums and dX stay block matmuls in JAX, as in the
scans.

It is compiled on first use, on the machine it runs on (``g++ -O3 -march=native`` against jaxlib's
own FFI headers; nothing else), into ``cache_dir()/native`` under a name that holds everything the
build depends on, and registered with ``jax.ffi`` once per process. Where it cannot be built (no
C++ compiler, a failed build) ``unavailable`` says why: an explicit
``recurrence="native"`` raises ValueError with that reason, and ``auto`` and ``bptt_jax.tune``
keep the scans. The rules choose it for the GRU and the LSTM, and for the Elman cell up to N1 =
``kernels.NATIVE_ELMAN_MAX_HIDDEN`` (``kernels.NATIVE_AUTO_CELLS``: float32 on the CPU, where it
builds; the first such call builds it), with the whole sequence as one block for the gated cells
up to ``plan.NATIVE_WHOLE_ELEMENTS`` (the Elman cell in the scans' blocks, raised to the rows its
sums need: ``plan.elman_kernel_block``); ``bptt_jax.tune`` times it beside the scans for every cell
and keeps the faster.

Memory: the kernel's loops keep no scan buffers, so its plans compile to less temp memory than the
scans' (``max_memory`` and ``tune`` count XLA's memory analysis); its own scratch, the packed
recurrent weights (N1 x G N1 floats) and one step's [B, G N1], lives on the heap outside that
analysis, independent of T.

jax cannot differentiate an FFI call: the kernel serves the explicit BPTT (``bptt``, ``rnn_states``
with grad="bptt"); ``loss``, ``forward`` and grad="autodiff" run the scans (``kernels.resolve``).
Under ``jax.vmap`` the kernel runs once per batched element (``vmap_method="sequential"``), except
in ``core.sequence.layer_states`` (the Equinox layer's one-sequence call), whose batching rules run
one call for the whole vmapped batch (``reverse_d``, ``elman_reverse(..., batch_major=True)``: the
reverse call then writes dA and dV batch-major, as vmap lays its batched arrays out).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bptt_jax.core import host
from bptt_jax.core.cells import gru
from bptt_jax.core.cells.base import flat
from bptt_jax.core.precision import mm

Array = jax.Array

SOURCE = Path(__file__).with_name("cell_kernels.cc")
FLAGS = (
    "-std=c++17",
    "-O3",
    "-march=native",
    "-fopenmp-simd",  # the norms' sums vectorized (OpenMP's simd pragmas only, no runtime)
    "-fno-math-errno",
    "-fno-trapping-math",
    "-shared",
    "-fPIC",
)
CELLS = ("elman", "lstm", "gru")
# A kept gate cache's width in units of N1 (forward's ``store``): the LSTM's [i | f | g | o], the
# GRU's [r | z | n] (its reverse call forms V_n again; a 4 N1 cache with V_n, gru.gate_cache's,
# is read as well, and the forward call keeps one where ``gru_keeps_vn`` says).
CACHE_WIDTH = {"lstm": 4, "gru": 3}
ACTIVATIONS = {"tanh": 0, "relu": 1, "sigmoid": 2, "identity": 3}  # f1's codes in cell_kernels.cc
TARGETS = {  # (cell, loop) -> (the name registered with jax.ffi, the handler's symbol)
    ("elman", "forward"): ("bptt_jax_elman_forward", "BpttElmanForward"),
    ("elman", "reverse"): ("bptt_jax_elman_reverse", "BpttElmanReverse"),
    ("lstm", "forward"): ("bptt_jax_lstm_forward", "BpttLstmForward"),
    ("lstm", "reverse"): ("bptt_jax_lstm_reverse", "BpttLstmReverse"),
    ("gru", "forward"): ("bptt_jax_gru_forward", "BpttGruForward"),
    ("gru", "reverse"): ("bptt_jax_gru_reverse", "BpttGruReverse"),
}
COMPILE_TIMEOUT_S = 300
# The GRU's reverse call sums dWh and dbh itself (``reverse(..., sum_in_kernel=True)``) for blocks of
# at least this many rows C B where the gates are kept (backward.cell_backward): there it saves the
# [C, B, 3 N1] dV array at the speed of XLA's dots; for short blocks (segments of a few steps,
# gates recomputed per block) the calls' own chunks on one core ran slower (a Flax GRU model's
# step with checkpoint_every=8: 0.92x of Flax's speed against 1.03x, gates="recompute" 1.15-1.18x
# against 1.32x; benchmarks/nnx_speed.py). A constant measured on one Xeon, not at run time.
KERNEL_SUM_ROWS = 1024
# The LSTM's reverse call sums dWx, dWh and db itself beside its steps (``reverse(...,
# sum_in_kernel=True)``) for blocks of at least KERNEL_SUM_ROWS rows with the gates kept whose
# per-step matmul stays on one thread (B 4 N1 N1 multiply-adds up to cell_kernels.cc's
# kParallelMacs, 2^23: ``one_thread``): a helper thread takes the sums chunk by chunk as the steps
# finish them. Measured on a 2-core Xeon, the reverse
# call alone with its sums against XLA's dots after it: 1.1x at (100, 32, 64, 128), 1.7x at
# (1000, 16, 64, 128); where the per-step matmul has two threads the sums waited for the steps'
# end and ran 0.83-0.94x, so XLA's dots keep them there. The GRU's call, where it sums (gates
# kept), does the same for all four sums up to that size (B 3 N1 N1), and sums dWh on the steps'
# team above it. The Elman cell's call sums dW1, dW11 and db1 (and makes dX) beside its steps up to
# B N1 N1 = 2^23: bptt with the kernel, sums beside against XLA's dots after, 1.12x at (1000, 16,
# 64, 128, 64), 1.20x at (200, 64, 128, 256, 128), 0.98x at (100, 32, 64, 128, 64) (noise).
PARALLEL_MACS = 1 << 23
# The gated cells' forward call runs its step loop on two threads, each for a half of the batch
# rows (no handshake between them per step; X Wx first, on both), where the call has at least
# SPLIT_ROWS rows, its recurrence (T B G N1 N1 multiply-adds) at least SPLIT_MACS and the packed Wh
# at most SPLIT_WEIGHT_BYTES (each thread reads all of it every step); elsewhere as before (X Wx
# beside the steps, or the per-step matmul split over two threads). Measured on a 2-core Xeon
# (2026-12-05): the forward calls of the LSTM config's two layers (64, 32, 103 | 256, 256) 9.0 ->
# 5.5 ms and 9.3 -> 8.0 ms alone, the model's bptt call about 53 -> 50.5 ms (A/B over alternating
# processes); the GRU's 6.1 -> 4.6 and 7.1 -> 6.5 ms, its call unchanged within the noise.
SPLIT_ROWS = 16
SPLIT_MACS = 1 << 22
SPLIT_WEIGHT_BYTES = 1 << 20


def sums_in_kernel(cell: str, rows: int, batch: int, n1: int, cache_kept: bool) -> bool:
    """Whether ``reverse`` sums the weight gradients itself for a block of ``rows`` = C B rows of a
    layer of ``n1`` units (``cache_kept``: the forward pass stored the gates)."""
    if rows < KERNEL_SUM_ROWS:
        return False
    if cell == "elman":  # no gates to keep; its sums beside the steps, where they have one thread
        return one_thread(cell, batch, n1)
    if not cache_kept:  # gates recomputed: blocks, XLA's dots faster
        return False
    return cell == "gru" or one_thread(cell, batch, n1)


def _build_dir() -> Path:
    """``cache_dir()/native``, or a fresh temporary directory where that cannot be written."""
    d = host.cache_dir() / "native"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=d, delete=True)
        probe.close()
        return d
    except OSError:
        return Path(tempfile.mkdtemp(prefix="bptt_jax_native_"))


def _compile() -> Path | str:
    """The kernel's shared library, compiled if no build of this source, compiler, headers and
    processor is cached yet (written to a temporary name, then renamed: safe for concurrent
    processes); or why it could not be built."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return "no C++ compiler (g++, or $CXX) on PATH"
    import jaxlib

    include = Path(jaxlib.__file__).parent / "include"
    if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
        return f"jaxlib's XLA FFI headers are not in {include}"
    command = [compiler, *FLAGS, f"-I{include}", str(SOURCE)]
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(command).encode(),
        jaxlib.__version__.encode(),
        host.describe_host().encode(),
    ):
        digest.update(part)
    out_dir = _build_dir()
    target = out_dir / f"cell_kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.part")
    os.close(fd)
    try:
        done = subprocess.run([*command, "-o", tmp], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            return f"compiling {SOURCE.name} failed: {done.stderr.strip()[-400:]}"
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        return f"compiling {SOURCE.name} failed: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _load() -> str | None:
    """Builds (or finds) and registers the kernel once per process: None, or why it cannot run."""
    lib_path = _compile()
    if isinstance(lib_path, str):
        return lib_path
    try:
        lib = ctypes.CDLL(str(lib_path))
        for target, symbol in TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError, ValueError) as e:
        return f"loading {lib_path.name} failed: {e}"
    return None


def unavailable() -> str | None:
    """Why the kernel cannot run in this process (building it on first call), or None."""
    return _load()


def _mask(valid: Array | None, t_len: int, batch: int) -> Array:
    return jnp.ones((t_len, batch), bool) if valid is None else valid


def _activation_code(activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: the kernel knows {sorted(ACTIVATIONS)}, got {activation!r}")
    return np.int32(ACTIVATIONS[activation])


def elman_forward(w11: Array, activation: str, us: Array, h0: Array, valid: Array | None) -> Array:
    """The Elman cell's forward step loop over C steps, given u(t) = X(t) W1 + b1 [C, B, N1] and
    h0 [B, N1]: the states h(t) = f1(u(t) + h(t-1) W11) [C, B, N1] (held where not valid), as
    ``kernels.forward_recurrence``."""
    none = jnp.zeros((0,), jnp.float32)
    return _elman_forward(w11, activation, us, h0, valid, none, none)


def elman_forward_x(layer, activation: str, xs: Array, h0: Array, valid: Array | None) -> Array:
    """``elman_forward`` from the layer's input X [C, B, N_in]: the call forms u(t) = X(t) W1 + b1
    itself, into the states' own rows ahead of the steps (on its helper thread where the per-step
    matmul has one thread, as the gated cells' forward calls), so no [C, B, N1] array of u(t)."""
    return _elman_forward(layer.w11, activation, xs, h0, valid, layer.w1, layer.b1)


def _elman_forward(w11, activation, us_or_xs, h0, valid, w1, b1):
    t_len, batch, _ = us_or_xs.shape
    out = jax.ShapeDtypeStruct((t_len, batch, w11.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS["elman", "forward"][0], out, vmap_method="sequential")
    return call(us_or_xs, w11, h0, _mask(valid, t_len, batch), w1, b1, activation=_activation_code(activation))


def elman_reverse(
    w11: Array,
    activation: str,
    hs: Array,
    dhs_above: Array,
    valid: Array | None,
    dh_init: Array | None,
    *,
    batch_major: bool = False,
):
    """The Elman cell's reverse recursion over C steps (``cells.elman.reverse_recurrence``'s loop):
    (dZ1 [C, B, N1] (``batch_major``: [B, C, N1]), dDIV/dh(-1) [B, N1], ||dh(t)|| [C, B])."""
    dzs, dh_m1, norms, _, _ = _elman_reverse(w11, activation, hs, dhs_above, valid, dh_init, batch_major=batch_major)
    return dzs, dh_m1, norms


def elman_reverse_sums(
    layer, activation: str, xs: Array, h0: Array, hs: Array, dhs_above: Array, valid, dh_init, *, dx: bool
):
    """``elman_reverse`` where ``sums_in_kernel("elman", ...)`` holds: the call also sums dW1 =
    sum_t X(t)^T dZ1(t), dW11 = sum_t h(t-1)^T dZ1(t) (h(-1) = h0) and db1 = sum_t dZ1(t), and with
    ``dx`` makes dX = dZ1 W1^T [C, B, N_in] for the layer below, on a helper thread beside the
    steps, chunk by chunk as they finish (as the LSTM's call). Returns (the layer's gradients,
    dDIV/dh(-1), dX (with ``dx``) or dZ1, ||dh(t)||)."""
    dzs, dh_m1, norms, grads, dxs = _elman_reverse(
        layer.w11, activation, hs, dhs_above, valid, dh_init, xs=xs, h0=h0, w1=layer.w1, dx=dx
    )
    return type(layer)(*grads), dh_m1, dxs if dx else dzs, norms


def _elman_reverse(
    w11, activation, hs, dhs_above, valid, dh_init, *, xs=None, h0=None, w1=None, dx=False, batch_major=False
):
    """(dZ1, dh(-1), norms, (dW1, dW11, db1) or None, dX or None): one reverse call, with the sums
    (and dX) where ``xs`` is given."""
    t_len, batch, n1 = hs.shape
    f32 = jnp.float32
    dh0 = jnp.zeros((batch, n1), f32) if dh_init is None else dh_init
    sums = xs is not None
    none = jnp.zeros((0,), f32)
    dx_shape = xs.shape if sums and dx else (0,)
    out = (
        jax.ShapeDtypeStruct((batch, t_len, n1) if batch_major else hs.shape, f32),
        jax.ShapeDtypeStruct((batch, n1), f32),
        jax.ShapeDtypeStruct((t_len, batch), f32),
        jax.ShapeDtypeStruct(w1.shape if sums else (0,), f32),  # dW1
        jax.ShapeDtypeStruct((n1, n1) if sums else (0,), f32),  # dW11
        jax.ShapeDtypeStruct((n1,) if sums else (0,), f32),  # db1
        jax.ShapeDtypeStruct(dx_shape, f32),  # dX, where asked
    )
    reuse = dx_shape == dhs_above.shape and dhs_above.dtype == f32  # dX over dH_above (see _reverse)
    call = jax.ffi.ffi_call(
        TARGETS["elman", "reverse"][0], out, vmap_method="sequential", input_output_aliases={1: 6} if reuse else None
    )
    dzs, dh_m1, norms, dw1, dw11, db1, dxs = call(
        hs,
        dhs_above,
        w11,
        _mask(valid, t_len, batch),
        dh0,
        h0 if sums else none,
        xs if sums else none,
        w1 if sums else none,
        activation=_activation_code(activation),
        batch_major=np.int32(batch_major),
    )
    return dzs, dh_m1, norms, (dw1, dw11, db1) if sums else None, dxs if sums and dx else None


def gru_keeps_vn(batch: int, n1: int) -> bool:
    """Whether the GRU's forward call keeps V_n = h(t-1) W_hn + b_hn in its gate cache ([C, B, 4 N1])
    when it keeps the gates: where the reverse call's per-step matmul runs on two threads (not
    ``one_thread``). There the lean cache's price, the reverse call's one more matmul per chunk
    (N1 of its 3 N1 columns again), falls on a call whose two threads are both busy with the steps.
    Measured on a 2-core Xeon (family 6, model 207; 2026-12-06), the default ``bptt`` call with V_n
    kept over the lean cache, the same plan otherwise, in one process (benchmarks/gru_vn.py, two runs,
    benchmarks/results/native_vn_rule_s25*_emr.md; two earlier runs of the same A/B by a script not
    committed): 1.04-1.12x at (100, 64, 256, 512, 256) (four runs), 0.94-1.05x at (200, 64, 128, 256,
    128) (median of four 1.03x), both on two threads, at 1.12x the temp memory. On one thread the
    runs spread over 0.95-1.25x ((100, 32, 64, 128, 64), (1000, 16, 64, 128, 64)): there the cache
    stays lean for its memory, which the NNX and Equinox layers' targets need (issue 33: 0.45x the
    framework's temp with it, 0.54x without)."""
    return not one_thread("gru", batch, n1)


def cache_width(cell: str, batch: int, n1: int) -> int:
    """The width in units of N1 of the gate cache the kernel's forward call keeps for ``batch`` rows:
    ``CACHE_WIDTH``, the GRU's 4 where ``gru_keeps_vn``."""
    return 4 if cell == "gru" and gru_keeps_vn(batch, n1) else CACHE_WIDTH[cell]


def forward(
    cell: str,
    layer,
    xs: Array,
    s0: Array,
    valid: Array | None,
    store: bool,
    *,
    keep_vn: bool | None = None,
    apart: bool = False,
):
    """The forward step loop of one layer of ``cell`` ("lstm" or "gru") over C steps, given its
    parameters ``layer`` (wx, wh, bx, bh), its input X [C, B, N_in] and the entering state s0 [B, W]:
    the states [C, B, W], and with ``store`` also the gate cache [C, B, cache_width N1]: the
    LSTM's [i | f | g | o] (``lstm.recur_cache``'s), the GRU's [r | z | n] (``gru.recur_cache``'s
    without V_n = h(t-1) W_hn + b_hn, which the reverse call forms again from the states, a chunk of
    steps in one matmul: a quarter less memory for the stored gates), or where ``gru_keeps_vn``
    holds [r | z | n | V_n]. The kernel forms
    A(t) = X(t) Wx + bx itself (kept gates: for all C steps in one matmul, into the cache's own
    buffer), so no [C, B, G N1] array of pre-activations sits beside the cache. ``keep_vn``: the
    GRU's cache with V_n, [C, B, 4 N1] (the reverse call then reads it) or without; None:
    ``gru_keeps_vn``'s rule (``cache_width``). ``apart`` (the LSTM): the states as the pair (h(t)
    [C, B, N1], c(t) [C, B, N1]) in two buffers instead of [h | c] in one, so that h(t) -- the
    layer's output -- is no slice of the states (a copy). The LSTM's reverse calls read c(t) alone
    (``reverse_d``'s ``ss`` may be it) and h(t) beside it where they sum dWh (``reverse``: both as
    slices of the join [h | c], which XLA folds back into the two buffers)."""
    t_len, batch, _ = xs.shape
    n1 = layer.wh.shape[0]
    f32 = jnp.float32
    width = cache_width(cell, batch, n1) if keep_vn is None else 4 if keep_vn else CACHE_WIDTH[cell]
    if apart and cell != "lstm":
        raise ValueError(f"native.forward: apart=True is the LSTM's ([h | c] states), not the {cell}'s")
    states = jax.ShapeDtypeStruct((t_len, batch, n1 if apart else s0.shape[-1]), f32)
    # the cache, or one step's scratch
    gates = jax.ShapeDtypeStruct((t_len, batch, width * n1) if store else (1, batch, 4 * n1), f32)
    c_apart = jax.ShapeDtypeStruct((t_len, batch, n1) if apart else (0,), f32)  # the LSTM's c(t), or nothing
    out = (states, c_apart, gates) if cell == "lstm" else (states, gates)
    call = jax.ffi.ffi_call(TARGETS[cell, "forward"][0], out, vmap_method="sequential")
    mask = _mask(valid, t_len, batch)
    if cell == "lstm":  # bx and bh add up: the kernel adds them once
        hs, cs, cache = call(xs, layer.wx, layer.wh, layer.bx + layer.bh, s0, mask)
        ss = (hs, cs) if apart else hs
    else:
        ss, cache = call(xs, layer.wx, layer.bx, layer.wh, layer.bh, s0, mask)
    return (ss, cache) if store else ss


def reverse(
    cell: str,
    layer,
    xs: Array,
    dhs_above: Array,
    cache: Array,
    s_in: Array,
    ss: Array,
    valid: Array | None,
    ds_init: Array | None,
    *,
    sum_in_kernel: bool = True,
):
    """One layer's BPTT over C steps with the gate cache given (the notes' BPTT of the cell, as the
    cell's ``reverse`` and ``weight_grads``): its input X [C, B, N_in], the states ss [C, B, W] and
    the state entering the first step s_in [B, W]. Returns (the gradients of ``layer`` (the cell's
    NamedTuple), ds(-1) [B, W], dA [C, B, G N1], norms: the LSTM's [C, B, 2] ||dDIV/dh(t)|| and
    ||dDIV/dc(t)||, the GRU's [C, B] ||dDIV/dh(t)||).

    The kernel's reverse call reads h(t-1) from ss and s_in (no shifted copy of the states). With
    ``sum_in_kernel`` (``sums_in_kernel`` says where) the GRU's call sums dWh = sum_t h(t-1)^T dV(t)
    and dbh = sum_t dV(t) itself (chunks of rows, its own matmul), so its dV [C, B, 3 N1] never
    becomes an array: where its per-step matmul has one thread, with dWx = X^T dA and dbx, all on
    a helper thread beside the steps (dV in a ring of four chunks), else as it walks the steps,
    dWx and dbx then XLA's; the LSTM's sums dWx =
    sum_t X(t)^T dA(t), dWh = sum_t h(t-1)^T dA(t) and dbx = dbh = sum_t dA(t) on a helper thread,
    chunk by chunk as the steps finish (its steps' thread takes the chunks left when they are
    done; each sum runs its chunks in one order, so the sums do not depend on the threads).
    Without, the call returns dA (and the GRU's dV) for XLA's dots. The LSTM's call writes dA over
    its gate cache."""
    grads, ds_m1, das, norms, _ = _reverse(cell, layer, xs, dhs_above, cache, s_in, ss, valid, ds_init, sum_in_kernel)
    return grads, ds_m1, das, norms


def reverse_d(
    cell: str,
    wh: Array,
    dhs_above: Array,
    cache: Array,
    s_in: Array,
    ss: Array,
    valid,
    ds_init,
    *,
    batch_major=False,
    bh: Array | None = None,
):
    """The reverse recursion alone, no sums: (dA [C, B, G N1], dV [C, B, G N1] (the LSTM's: dA
    itself), ds(-1) [B, W]) of one layer of ``cell`` ("lstm" or "gru") from its gate cache, for
    weight-gradient matmuls outside the call (``core.sequence``); as ``reverse`` without
    ``sum_in_kernel``. ``wh``: the recurrent weights [N1, G N1]; ``bh``: the GRU's recurrent bias
    [3 N1] (its call reads b_hn). ``batch_major``: dA and dV come as [B, C, G N1] (the call writes
    each row there; the LSTM's dA then not over its gate cache). The LSTM's ``ss`` may be c(t) alone
    [C, B, N1] (``forward(..., apart=True)``'s second array): its recursion reads no h(t)."""
    t_len, batch, _ = cache.shape
    n1 = wh.shape[0]
    width = s_in.shape[-1]
    f32 = jnp.float32
    ds0 = jnp.zeros((batch, width), f32) if ds_init is None else ds_init
    valid = _mask(valid, t_len, batch)
    none = jnp.zeros((0,), f32)
    no_xs = jnp.zeros((t_len, batch, 0), f32)  # the call's input X: read only for sums it does not make
    empty = jax.ShapeDtypeStruct((0,), f32)
    rows = (batch, t_len) if batch_major else (t_len, batch)
    mode = np.int32(batch_major)
    if cell == "lstm":
        out = (
            jax.ShapeDtypeStruct((*rows, 4 * n1), f32),
            jax.ShapeDtypeStruct((batch, width), f32),
            jax.ShapeDtypeStruct((t_len, batch, 2), f32),
            *(empty,) * 4,
        )
        call = jax.ffi.ffi_call(
            TARGETS[cell, "reverse"][0],
            out,
            vmap_method="sequential",
            input_output_aliases=None if batch_major else {1: 0},  # dA over the gates, time-major
        )
        das, ds_m1, *_ = call(dhs_above, cache, s_in, ss, wh, valid, ds0, no_xs, none, none, batch_major=mode)
        return das, das, ds_m1
    if bh is None:
        raise ValueError("reverse_d: the GRU's call needs bh (V_n = h(t-1) W_hn + b_hn)")
    g_shape = jax.ShapeDtypeStruct((*rows, 3 * n1), f32)
    carry, norms = jax.ShapeDtypeStruct((batch, width), f32), jax.ShapeDtypeStruct((t_len, batch), f32)
    out_gru = (g_shape, g_shape, empty, empty, carry, norms, empty, empty, empty)
    call = jax.ffi.ffi_call(TARGETS[cell, "reverse"][0], out_gru, vmap_method="sequential")
    das, dvs, _, _, ds_m1, *_ = call(dhs_above, cache, s_in, ss, wh, valid, ds0, no_xs, none, bh, batch_major=mode)
    return das, dvs, ds_m1


def dx_in_kernel(cell: str, rows: int, batch: int, n1: int, cache_kept: bool) -> bool:
    """Whether ``reverse_dx`` applies: the block's weight-gradient sums run on the helper thread
    (``sums_in_kernel`` with the per-step matmul on one thread), which then also makes dX."""
    return sums_in_kernel(cell, rows, batch, n1, cache_kept) and one_thread(cell, batch, n1)


def one_thread(cell: str, batch: int, n1: int) -> bool:
    """Whether the kernel's per-step matmul (B G N1 N1 multiply-adds) runs on one thread in a call
    with work for its helper (cell_kernels.cc's team_for: up to kParallelMacs itself; without such
    work a call splits the matmul from kParallelMacs), leaving the second core to the helper."""
    return batch * {"lstm": 4, "gru": 3}.get(cell, 1) * n1 * n1 <= PARALLEL_MACS


def split_rows(cell: str, t_len: int, batch: int, n1: int) -> bool:
    """Whether a gated cell's forward call splits its batch rows over two threads where the process
    may use two cores (cell_kernels.cc's split_rows: see SPLIT_ROWS)."""
    gates = {"lstm": 4, "gru": 3}[cell]
    return (
        batch >= SPLIT_ROWS
        and t_len * batch * n1 * gates * n1 >= SPLIT_MACS
        and n1 * gates * n1 * 4 <= SPLIT_WEIGHT_BYTES
    )


def reverse_dx(cell: str, layer, xs: Array, dhs_above: Array, cache: Array, s_in: Array, ss: Array, valid, ds_init):
    """``reverse`` where ``dx_in_kernel`` holds, with dX = dA Wx^T [C, B, N_in] (the gradient handed to
    the layer below) made on the helper thread beside the steps too, in place of dA: (grads, ds(-1),
    dX, norms). The GRU's dA then lives in a ring of chunks, as its dV: no [C, B, 3 N1] array."""
    grads, ds_m1, _, norms, dxs = _reverse(cell, layer, xs, dhs_above, cache, s_in, ss, valid, ds_init, True, dx=True)
    return grads, ds_m1, dxs, norms


def _reverse(cell, layer, xs, dhs_above, cache, s_in, ss, valid, ds_init, sum_in_kernel, *, dx=False):
    """(grads, ds(-1), dA or None, norms, dX or None): ``reverse`` and ``reverse_dx``."""
    t_len, batch, _ = cache.shape
    width = ss.shape[-1]
    n1 = layer.wh.shape[0]
    f32 = jnp.float32
    ds0 = jnp.zeros((batch, width), f32) if ds_init is None else ds_init
    valid = _mask(valid, t_len, batch)
    dx_shape = xs.shape if dx else (0,)
    # dX may take dH_above's buffer: a chunk of dX is written after the steps that read its rows of
    # dH_above (the layer above's gradient, dead after this call; XLA copies it where it is not)
    reuse = dx and xs.shape == dhs_above.shape and dhs_above.dtype == f32
    if cell == "lstm":
        out = (
            jax.ShapeDtypeStruct(cache.shape, f32),
            jax.ShapeDtypeStruct((batch, width), f32),
            jax.ShapeDtypeStruct((t_len, batch, 2), f32),
            jax.ShapeDtypeStruct(layer.wx.shape if sum_in_kernel else (0,), f32),  # dWx
            jax.ShapeDtypeStruct(layer.wh.shape if sum_in_kernel else (0,), f32),  # dWh
            jax.ShapeDtypeStruct(layer.bh.shape if sum_in_kernel else (0,), f32),  # dbx = dbh
            jax.ShapeDtypeStruct(dx_shape, f32),  # dX, where asked
        )
        aliases = {1: 0, 0: 6} if reuse else {1: 0}  # dA overwrites the gates in place
        call = jax.ffi.ffi_call(
            TARGETS[cell, "reverse"][0], out, vmap_method="sequential", input_output_aliases=aliases
        )
        # h(t) and c(t) as two operands: slices of [h | c] that XLA folds back into the forward
        # call's two buffers where the states come from ``forward(..., apart=True)`` unchanged
        hs, cs = ss[..., :n1], ss[..., n1:]
        das, ds_m1, norms, dwx, dwh, db, dxs = call(
            dhs_above, cache, s_in, cs, layer.wh, valid, ds0, xs, layer.wx, hs, batch_major=np.int32(0)
        )
        if not sum_in_kernel:  # lstm.weight_grads' sums, h(t-1) from h(t) alone (not from a shifted [h | c])
            h_tm1 = _shifted(s_in[:, :n1], hs)
            dg = flat(das)
            db = jnp.sum(dg, axis=0)
            grads = type(layer)(mm(flat(xs).T, dg), mm(flat(h_tm1).T, dg), db, db)
            return grads, ds_m1, das, norms, None
        return type(layer)(dwx, dwh, db, db), ds_m1, das, norms, dxs if dx else None
    g_shape = (t_len, batch, 3 * n1)
    beside = sum_in_kernel and one_thread(cell, batch, n1)  # dWx and dbx too, on the helper
    out_gru = (
        jax.ShapeDtypeStruct((0,) if dx else g_shape, f32),  # dA (in a ring where dX is made)
        jax.ShapeDtypeStruct((0,) if sum_in_kernel else g_shape, f32),  # dV, where XLA sums it
        jax.ShapeDtypeStruct(layer.wh.shape if sum_in_kernel else (0,), f32),
        jax.ShapeDtypeStruct((3 * n1,) if sum_in_kernel else (0,), f32),
        jax.ShapeDtypeStruct((batch, width), f32),
        jax.ShapeDtypeStruct((t_len, batch), f32),
        jax.ShapeDtypeStruct(layer.wx.shape if beside else (0,), f32),
        jax.ShapeDtypeStruct((3 * n1,) if beside else (0,), f32),
        jax.ShapeDtypeStruct(dx_shape, f32),
    )
    aliases = {0: 8} if reuse else None
    call = jax.ffi.ffi_call(
        TARGETS[cell, "reverse"][0], out_gru, vmap_method="sequential", input_output_aliases=aliases
    )
    das, dvs, dwh, dbh, ds_m1, norms, dwx, dbx, dxs = call(
        dhs_above, cache, s_in, ss, layer.wh, valid, ds0, xs, layer.wx, layer.bh, batch_major=np.int32(0)
    )
    if not sum_in_kernel:
        return gru.weight_grads(layer, xs, _shifted(s_in, ss), das, dvs), ds_m1, das, norms, None
    if beside:
        return type(layer)(dwx, dwh, dbx, dbh), ds_m1, None if dx else das, norms, dxs if dx else None
    da = flat(das)
    grads = type(layer)(mm(flat(xs).T, da), dwh, jnp.sum(da, axis=0), dbh)
    return grads, ds_m1, das, norms, None


def _shifted(s_in: Array, ss: Array) -> Array:
    """s(t-1) [C, B, W] for XLA's weight-gradient dots: s_in, then ss without its last step."""
    return jnp.concatenate([s_in[None], ss[:-1]], axis=0)
