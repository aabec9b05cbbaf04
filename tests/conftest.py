"""Hypothesis profiles: "ci" (default: bounded, derandomized) and "dev" (more examples)."""

import os

# XLA:CPU compile economy. The suite's time is mostly XLA compiling hundreds of small programs (each
# hypothesis example draws new shapes, so both the explicit BPTT and its jax.grad oracle compile
# again), and most of a compile is code generation for code that then runs for microseconds. The
# tests therefore compile at LLVM's level 0 without its expensive passes, and with XLA:CPU's older
# loop emitters instead of its MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`): the
# same HLO programs and float semantics (no fast-math either way), only other, less optimised
# machine code. Measured on the 2-core CPU: the heaviest property tests take 0.55-0.65 of their time
# at the default level; the emitter flag then halved the compile time of a set of bptt programs
# (3.4-3.6 s -> 1.7 s) and cut a one-op program's from ~50 to ~30 ms. Set before JAX creates its
# backend; inherited by the tests' subprocesses (the command, the 4-device checks, the multi-process
# runs), except the two timed multi-process scenarios (a lost peer, SIGTERM to the launcher), which
# keep XLA's defaults. A flag this jaxlib does not know would abort every process that starts XLA,
# so each optional flag is tried once in a subprocess (the first process that imports this file
# does it and passes the result on in BPTT_JAX_TEST_XLA_FLAGS to the processes it starts).
# BPTT_JAX_TEST_FAST_COMPILE=0 compiles with XLA's defaults instead; benchmarks/gpu_check.py sets
# it, so the GPU's code generation is never changed by this.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
OPTIONAL_TEST_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def _accepted(flag: str) -> bool:
    """Whether this jaxlib's XLA starts with ``flag`` (an unknown flag aborts the process)."""
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    try:
        return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


if os.environ.get("BPTT_JAX_TEST_FAST_COMPILE", "1") != "0":
    if "BPTT_JAX_TEST_XLA_FLAGS" not in os.environ:
        extra = [f for f in OPTIONAL_TEST_XLA_FLAGS if _accepted(f)]
        os.environ["BPTT_JAX_TEST_XLA_FLAGS"] = " ".join([TEST_XLA_FLAGS, *extra])
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {os.environ['BPTT_JAX_TEST_XLA_FLAGS']}".strip()

# The plan cache (bptt_jax.core.plancache): the tests never read or write the user's. Each test
# process gets an empty folder of its own (inherited by the subprocesses it starts), removed at exit.
if "BPTT_JAX_TEST_PLAN_CACHE" not in os.environ:
    import atexit as _atexit
    import shutil as _shutil
    import tempfile as _tempfile

    os.environ["BPTT_JAX_TEST_PLAN_CACHE"] = _tempfile.mkdtemp(prefix="bptt-jax-plans-")
    _atexit.register(_shutil.rmtree, os.environ["BPTT_JAX_TEST_PLAN_CACHE"], True)
os.environ["BPTT_JAX_CACHE_DIR"] = os.environ["BPTT_JAX_TEST_PLAN_CACHE"]

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=10,  # the suite's time on 2 cores is mostly these examples (each compiles new shapes)
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu",  # benchmarks/gpu_check.py: the same checks in a bounded device-time budget
    max_examples=5,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if os.environ.get("BPTT_JAX_TEST_XLA_CACHE", "1") != "0":
    # A persistent compilation cache, one folder per test process (JAX writes its entries without a
    # lock, so processes do not share one), emptied at exit. Programs compiled again after
    # `jax.clear_caches()` (below, per module) or traced again from new closures (the same jax.grad
    # oracle under both chex variants, the same shapes in several modules) are then read back
    # instead of compiled: the suite's time is mostly XLA compilation. BPTT_JAX_TEST_XLA_CACHE=0
    # turns it off.
    import atexit
    import shutil
    import tempfile

    _xla_cache = tempfile.mkdtemp(prefix="bptt_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _xla_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

if jax.default_backend() == "gpu":
    # XLA computes float32 matmuls in TF32 on NVIDIA GPUs by default (about 1e-3 relative): the tests
    # hold float32 to 1e-5 against jax.grad, so they pin full float32 for every dot instead of
    # loosening tolerances. The library leaves the user's setting alone (README, "Accelerators").
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Every compiled XLA:CPU executable maps memory sections, and the property tests compile
    thousands; kept alive all session they approached the kernel's limit on memory maps
    (vm.max_map_count, 65530: 56,000 maps were measured by the end of the suite) and one crashed a
    CI run in XLA's compiler. Clearing JAX's caches after each test module releases them (the
    largest module, test_bptt, adds ~27,000 on its own)."""
    yield
    jax.clear_caches()
