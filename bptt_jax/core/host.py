"""Where this machine keeps bptt_jax's files and what identifies its processor.

``cache_dir()``: ``$BPTT_JAX_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/bptt_jax``, else
``~/.cache/bptt_jax`` (the plan cache, ``plancache``, and the compiled kernel, ``native``, live
there). ``host()``: the CPU's name, vector extensions and usable cores, part of a tuned CPU plan's
key and of the compiled kernel's name (it is built with ``-march=native``), and printed by the
benchmarks beside their tables.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


def cache_dir() -> Path:
    """Where ``plans.json`` and the compiled kernel live (see the module's docstring)."""
    explicit = os.environ.get("BPTT_JAX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bptt_jax"


# The vector and matrix extensions that change which kernels XLA:CPU runs (the widths of its dots).
_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve", "sve2")


@functools.lru_cache(maxsize=1)
def _processor() -> tuple[str, tuple[str, ...]]:
    """(the processor's name with its family / model where Linux tells them, its extensions among
    ``_ISA``). Read once per process: the processor does not change under a running process."""
    name, family, model, flags = platform.processor() or platform.machine(), "", "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                field, _, value = line.partition(":")
                field, value = field.strip(), value.strip()
                if field == "model name":
                    name = value
                elif field == "cpu family":
                    family = value
                elif field == "model" and not model:
                    model = value
                elif field in ("flags", "Features"):
                    flags = set(value.split())
                if field == "" and flags:  # the first processor's block is enough
                    break
    except OSError:
        pass
    if family or model:
        name = f"{name} (family {family or '?'}, model {model or '?'})"
    return name, tuple(f for f in _ISA if f in flags)


def host() -> dict:
    """What identifies this machine's CPU for timing: its name (with family and model on Linux), its
    vector extensions (AVX2, AVX-512, AMX, NEON / SVE ...) and the logical cores this process may
    run on. Part of a CPU plan's key; benchmarks print it beside their tables."""
    name, isa = _processor()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return {"cpu": name, "isa": list(isa), "cores": cores}


def describe_host() -> str:
    """``host()`` in words, for the header of a benchmark's table."""
    h = host()
    isa = ", ".join(h["isa"]) or "no listed vector extensions"
    return f"{h['cpu']}, {isa}; {h['cores']} logical cores"
