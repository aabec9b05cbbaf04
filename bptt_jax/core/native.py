"""The LSTM's two loops as a compiled CPU kernel: ``recurrence="native"``.

``lstm_kernel.cc`` (beside this file) writes the LSTM's forward step loop and its reverse recursion
(the loop ``cells.lstm.reverse`` states, the notes' BPTT of this cell) as two XLA FFI handlers: one
call runs all C steps of a time block, per step one CBLAS sgemm (h(t-1) Wh forward, dG(t) Wh^T in
reverse) and one fused pass over the batch rows for the gate arithmetic, where XLA:CPU runs a
dozen separate operations per step. The input projection A = X Wx + bx, the gates' recomputation
with gates="recompute", the weight-gradient sums and dX stay block matmuls in JAX, as in the scans.

It is compiled on first use, on the machine it runs on (``g++ -O3 -march=native`` against jaxlib's
own FFI headers, linked with the sgemm of the ``scipy-openblas32`` wheel, ``pip install
'bptt-jax[native]'``), into ``cache_dir()/native`` under a name that holds everything the build
depends on, and registered with ``jax.ffi`` once per process. Where it cannot be built (no C++
compiler, no scipy-openblas32, a failed build) ``unavailable`` says why: an explicit
``recurrence="native"`` raises ValueError with that reason, and ``auto`` and ``bptt_jax.tune``
keep the scans. The rules never choose it; ``bptt_jax.tune`` times it beside the scans where it
applies (an LSTM in float32 on the CPU) and keeps it only where it measured faster.

jax cannot differentiate an FFI call: the kernel serves the explicit BPTT (``bptt``, ``rnn_states``
with grad="bptt"); ``loss``, ``forward`` and grad="autodiff" run the scans (``kernels.resolve``).
Under ``jax.vmap`` the kernel runs once per batched element (``vmap_method="sequential"``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from bptt_jax.core import host

Array = jax.Array

SOURCE = Path(__file__).with_name("lstm_kernel.cc")
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
TARGETS = {
    "forward": ("bptt_jax_lstm_forward", "BpttLstmForward"),
    "reverse": ("bptt_jax_lstm_reverse", "BpttLstmReverse"),
}
COMPILE_TIMEOUT_S = 300


def _blas() -> tuple[Path, str] | str:
    """(the directory of scipy-openblas32's library, its name for -l), or why it cannot be used."""
    if importlib.util.find_spec("scipy_openblas32") is None:
        return "scipy-openblas32 is not installed (pip install 'bptt-jax[native]')"
    import scipy_openblas32

    lib_dir, name = Path(scipy_openblas32.get_lib_dir()), scipy_openblas32.get_library()
    if not (lib_dir / f"lib{name}.so").exists():
        return f"scipy-openblas32's library lib{name}.so is not in {lib_dir}"
    return lib_dir, name


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


def _compile(lib_dir: Path, name: str) -> Path | str:
    """The kernel's shared library, compiled if no build of this source, compiler, headers, BLAS and
    processor is cached yet (written to a temporary name, then renamed: safe for concurrent
    processes); or why it could not be built."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return "no C++ compiler (g++, or $CXX) on PATH"
    import jaxlib

    include = Path(jaxlib.__file__).parent / "include"
    if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
        return f"jaxlib's XLA FFI headers are not in {include}"
    command = [compiler, *FLAGS, f"-I{include}", str(SOURCE), f"-L{lib_dir}", f"-l{name}", f"-Wl,-rpath,{lib_dir}"]
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(command).encode(),
        jaxlib.__version__.encode(),
        host.describe_host().encode(),
    ):
        digest.update(part)
    out_dir = _build_dir()
    target = out_dir / f"lstm_kernel-{digest.hexdigest()[:16]}.so"
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
    blas = _blas()
    if isinstance(blas, str):
        return blas
    lib_path = _compile(*blas)
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


def lstm_forward(wh: Array, bh: Array, a: Array, s0: Array, valid: Array | None, store: bool):
    """The forward step loop of one LSTM layer over C steps, given A = X Wx + bx [C, B, 4 N1] and the
    entering state s0 = [h | c] [B, 2 N1]: the states [h(t) | c(t)] [C, B, 2 N1], and with
    ``store`` also the gates [i | f | g | o] [C, B, 4 N1] (``cells.lstm.recur_cache``'s)."""
    t_len, batch, width = a.shape
    f32 = jnp.float32
    out = (
        jax.ShapeDtypeStruct((t_len, batch, width // 2), f32),
        jax.ShapeDtypeStruct((t_len if store else 1, batch, width), f32),  # one step's scratch otherwise
    )
    call = jax.ffi.ffi_call(TARGETS["forward"][0], out, vmap_method="sequential")
    ss, gates = call(a, wh, bh, s0, _mask(valid, t_len, batch))
    return (ss, gates) if store else ss


def lstm_reverse(
    wh: Array, dhs_above: Array, gates: Array, s_tm1s: Array, ss: Array, valid: Array | None, ds_init: Array | None
):
    """The reverse recursion of one LSTM layer over C steps (``cells.lstm.reverse``): (dG [C, B, 4 N1],
    ds(-1) [B, 2 N1], norms [C, B, 2]: ||dDIV/dh(t)|| and ||dDIV/dc(t)||, as ``cells.lstm.reverse``'s)."""
    t_len, batch, width = gates.shape
    f32 = jnp.float32
    out = (
        jax.ShapeDtypeStruct(gates.shape, f32),
        jax.ShapeDtypeStruct((batch, width // 2), f32),
        jax.ShapeDtypeStruct((t_len, batch, 2), f32),
    )
    ds0 = jnp.zeros((batch, width // 2), f32) if ds_init is None else ds_init
    call = jax.ffi.ffi_call(TARGETS["reverse"][0], out, vmap_method="sequential")
    return call(dhs_above, gates, s_tm1s, ss, wh, _mask(valid, t_len, batch), ds0)
