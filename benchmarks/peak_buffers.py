"""What fills the temp memory of an Equinox model's training step: XLA's buffer assignment, largest first.

    python benchmarks/peak_buffers.py [--cell gru|lstm] [--vmapped] [--quick] [--min-mib M] [--out FILE]

Compiles ``eqx_speed.py``'s training step (our layers called once on the batch, or ``--vmapped``)
with XLA's dumps switched on for this process only (``XLA_FLAGS`` set by ``main`` before JAX
computes anything: a benchmark's choice, never the library's), and lists the values XLA placed in the step's temp
allocation at or above ``--min-mib`` MiB: size, offset (values that share offsets never live at
the same time) and the operation that makes each (its ``op_name``). The peak is where the
offsets pile up highest.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bptt_speed  # noqa: E402
import eqx_speed  # noqa: E402
import gate_blocks  # noqa: E402
import nnx_speed  # noqa: E402

VALUE = re.compile(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\)")


def temp_values(text: str) -> list[tuple[str, int, int]]:
    """(name, size, offset) of every value in the buffer assignment's preallocated temp allocation."""
    values, inside = [], False
    for line in text.splitlines():
        if line.startswith("allocation "):
            inside = "preallocated-temp" in line
        elif inside and (m := VALUE.search(line)):
            values.append((m.group(1), int(m.group(2)), int(m.group(3))))
    return values


def op_names(hlo: str) -> dict[str, str]:
    """{instruction name: its op_name metadata} of the optimized module's text."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*op_name=\"([^\"]*)\"", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    ap.add_argument("--vmapped", action="store_true", help="the model vmapped over the batch (Equinox's way)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--min-mib", type=float, default=1.0)
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args(argv)
    # XLA reads its flags once, when JAX first starts a backend: set here, before this process
    # computes anything (run as a script; imported into a process that already computed, XLA
    # dumps nothing and this raises below)
    dump = tempfile.mkdtemp(prefix="bptt_jax_peak_")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
    ).strip()
    sizes = nnx_speed.QUICK if args.quick else nnx_speed.SHAPE
    step, state = eqx_speed.contender(args.cell, sizes, True, batch_call=not args.vmapped)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, sizes["V"], (sizes["B"], sizes["T"])))
    compiled = step.lower(state, ids, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    files = sorted(Path(dump).glob("*jit_step*buffer-assignment.txt"))
    hlos = sorted(Path(dump).glob("*jit_step*after_optimizations.txt"))
    if not files or not hlos:
        raise RuntimeError(f"XLA wrote no buffer assignment for the step under {dump} (run this as a script)")
    names = op_names(hlos[-1].read_text())
    values = [v for v in temp_values(files[-1].read_text()) if v[1] >= args.min_mib * 2**20]
    call = "vmapped over the batch" if args.vmapped else "our layers called once on the batch"
    lines = [
        f"# The temp memory of an Equinox model's training step, {args.cell}, {call}",
        "",
        f"Machine: {gate_blocks.cpu_model()}, jax {jax.__version__}; command: "
        f"`python benchmarks/peak_buffers.py {' '.join(argv if argv is not None else sys.argv[1:])}`. Model as "
        f"eqx_speed.py (two layers of {sizes['N1']}, T {sizes['T']}, B {sizes['B']}); the step's temp memory "
        f"{temp / 2**20:.2f} MiB. Values of at least {args.min_mib} MiB, by offset:",
        "",
        "| offset MiB | size MiB | value | op_name |",
        "|---|---|---|---|",
    ]
    for name, size, offset in sorted(values, key=lambda v: (v[2], -v[1])):
        base = name.split("{")[0]
        lines.append(f"| {offset / 2**20:.2f} | {size / 2**20:.2f} | {name} | {names.get(base, '')[:90]} |")
    return bptt_speed._report(lines, args.out)


if __name__ == "__main__":
    main()
