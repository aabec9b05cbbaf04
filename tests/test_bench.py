"""A quick run of the benchmark script on tiny shapes, so it never rots (no timing assertions)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.bench
def test_benchmark_script_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bptt_speed", ROOT / "benchmarks/bptt_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bptt_speed"] = mod  # flax modules defined in it need their module registered
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.md"
    report = mod.main(["--quick", "--rounds", "1", "--out", str(out), "--cell", "elman"])
    assert out.read_text().strip() == report.strip()
    assert "| bptt |" in report and "| grad(naive scan) |" in report
    assert "bptt checkpoint_every=" in report
    assert "| bptt (direct call) |" in report and "## Summary" in report
    # Every contender's gradients agree with the explicit BPTT (the last column of the contender and
    # variant tables; the summary's rows start with the shape).
    checked = 0
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith(("| contender", "| variant", "| (", "| T, B")):
            assert float(line.rstrip(" |").split("|")[-1]) < 1e-4, line
            checked += 1
    assert checked >= 10


@pytest.mark.bench
def test_benchmark_gated_cells_quick():
    mod = _load("bptt_speed", "benchmarks/bptt_speed.py")
    report = mod.main(["--quick", "--rounds", "1", "--cell", "gru", "--cell", "lstm", "--no-torch-compile"])
    assert "## T, B, N, N1, M" not in report and "bptt checkpoint_every=" not in report  # no Elman tables
    for cell, flax_name, torch_name in (("GRU", "GRUCell", "nn.GRU"), ("LSTM", "OptimizedLSTMCell", "nn.LSTM")):
        assert f"## {cell}: T, B, N, N1, M = (12, 3, 5, 6, 7)" in report and f"## {cell} summary" in report
        table = report.split(f"## {cell}: T, B, N, N1, M")[1].split("\n\n")[1]
        rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
        names = {"bptt", "bptt (direct call)", "grad(loss)", "grad(plain scan)", "grad(hoisted, unroll=1)"}
        names.add("grad(hoisted, unroll=4)")
        for module, name in (("flax", f"flax RNN({flax_name})"), ("torch", f"torch {torch_name}")):
            if importlib.util.find_spec(module) is not None:  # optional contenders
                names.add(name)
        assert names <= set(rows), sorted(rows)
        for name in names:  # every contender's gradients agree with the explicit BPTT (GRU: b_hn != 0)
            assert float(rows[name].split("|")[-3]) < 1e-4, rows[name]


@pytest.mark.bench
def test_benchmark_dispatch_and_kernels_quick():
    mod = _load("bptt_speed", "benchmarks/bptt_speed.py")
    report = mod.main(["--quick", "--rounds", "1", "--dispatch-only"])
    assert "direct / outer compiled" in report and report.count("| (") == 2
    # The GPU check's contender set, kernels in interpret mode on a CPU.
    report = mod.main(
        [
            "--quick",
            "--rounds",
            "1",
            "--skip-long",
            "--kernels",
            "--gpu-set",
            "--precision",
            "highest",
            "--cell",
            "elman",
        ]
    )
    names = (
        "| bptt recurrence=scan |",
        "| bptt recurrence=pallas |",
        "| bptt scan unroll=8 |",
        "| bptt scan unroll=8 block_size=T |",
        "| grad(hoisted, unroll=8) |",
    )
    for name in names:
        row = next(line for line in report.splitlines() if line.startswith(name))
        assert float(row.rstrip(" |").split("|")[-1]) < 1e-4, row
    assert "| grad(naive scan) |" not in report and "torch.compile" not in report


@pytest.mark.bench
def test_gpu_check_parts_quick(capsys):
    """The GPU check's own parts (the kernel probe and the kernels-vs-scans sweep) at tiny sizes on a
    CPU: every case runs and the kernels agree with the scans (rows that fail say FAILED)."""
    mod = _load("gpu_check", "benchmarks/gpu_check.py")
    mod.part_probe(quick=True)
    mod.part_sweep(quick=True)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (") or line[:4] == "| 1 "]
    assert len(rows) >= 6 and not any("FAILED" in r for r in rows), rows
    probe_errs = [float(r.split("|")[4]) for r in rows if r.startswith("| (")]  # fwd err vs scan
    assert max(probe_errs) < 1e-6


@pytest.mark.bench
def test_train_speed_quick(tmp_path):
    mod = _load("train_speed", "benchmarks/train_speed.py")
    out = tmp_path / "train.md"
    # eager PyTorch only (fast); the compiled loop differs from it only by torch.compile around loss_fn
    report = mod.main(
        ["--quick", "--steps", "2", "--rounds", "1", "--warmup", "1", "--no-torch-compile", "--out", str(out)]
    )
    assert out.read_text().strip() == report.strip()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| bptt-jax")}
    assert set(rows) == {'bptt-jax, grad = "bptt"', 'bptt-jax, grad = "autodiff"'}
    # Same initial weights and batches: the two JAX contenders reach the same loss.
    losses = [float(line.rstrip(" |").split("|")[-1]) for line in rows.values()]
    assert abs(losses[0] - losses[1]) < 1e-3 * abs(losses[0])


@pytest.mark.bench
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_train_speed_gated_quick(cell):
    # The gated char-LM configs' models: the explicit BPTT, autodiff and (where torch is installed) the
    # PyTorch nn.GRU / nn.LSTM loop start from the same weights, read the same batches and end at the
    # same loss after the same Adam steps.
    mod = _load("train_speed", "benchmarks/train_speed.py")
    report = mod.main(
        ["--quick", "--cell", cell, "--steps", "2", "--rounds", "1", "--warmup", "1", "--no-torch-compile"]
    )
    assert f"char_lm_{cell}.toml" in report and f"{cell.upper()}, N = M" in report
    rows = [line for line in report.splitlines() if line.startswith(("| bptt-jax", "| PyTorch"))]
    losses = {line.split("|")[1].strip(): float(line.rstrip(" |").split("|")[-1]) for line in rows}
    want = {'bptt-jax, grad = "bptt"', 'bptt-jax, grad = "autodiff"'}
    try:
        import torch  # noqa: F401

        want.add("PyTorch eager")
    except ImportError:
        pass
    assert set(losses) == want
    ref = losses['bptt-jax, grad = "bptt"']
    for name, value in losses.items():
        assert abs(value - ref) < 1e-3 * abs(ref), (name, losses)


@pytest.mark.bench
def test_nnx_speed_quick(tmp_path, monkeypatch):
    pytest.importorskip("flax")
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path / "users-cache"))
    mod = _load("nnx_speed", "benchmarks/nnx_speed.py")
    report = mod.main(["--quick", "--cell", "elman", "--cell", "lstm"])
    rows = [line.split("|") for line in report.splitlines() if line.startswith(("| elman", "| lstm"))]
    seg, budget = f"{mod.OURS}, checkpoint_every=2", f"{mod.OURS}, max_memory=64KiB"
    tuned = f"{mod.OURS}, tuned (0.5 s per layer)"  # --quick: tune gets half a second per layer
    native = mod.resolve("auto", (mod.QUICK["N1"],), "float32", cell="lstm") == "native"  # the kernel is built
    kernel = [mod.SCANS, f"{mod.SCANS}, gates='recompute'"] if native else []
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("elman", mod.OURS),
        ("elman", tuned),
        *(("elman", name) for name in kernel[:1]),  # the Elman cell at N1 = 6: the kernel, the scans beside
        ("elman", seg),
        ("elman", budget),
        ("elman", mod.FLAX),
        ("lstm", mod.OURS),
        ("lstm", tuned),
        ("lstm", mod.LEAN),
        *(("lstm", name) for name in kernel),
        ("lstm", seg),
        ("lstm", budget),
        ("lstm", mod.FLAX),
    ]
    # the same Flax cells, switched by from_flax_cell (tuned, gates stored or recomputed, segments, a budget): the same loss
    n_elman = 5 + len(kernel[:1])
    for some in (rows[:n_elman], rows[n_elman:]):
        assert max(float(r[-2]) for r in some) - min(float(r[-2]) for r in some) < 1e-4
    assert not (tmp_path / "users-cache").exists()  # tuned in a cache of its own


@pytest.mark.bench
def test_eqx_speed_quick():
    pytest.importorskip("equinox")
    pytest.importorskip("flax")  # the script shares nnx_speed.py's timing loop
    _load("nnx_speed", "benchmarks/nnx_speed.py")
    mod = _load("eqx_speed", "benchmarks/eqx_speed.py")
    report = mod.main(["--quick"])
    rows = [line.split("|") for line in report.splitlines() if line.startswith(("| gru", "| lstm"))]
    kernel = (
        [f"{mod.BATCH}, recurrence='scan'", f"{mod.LEAN}, recurrence='scan'"]
        if mod.native_reason("gru", "float32") is None
        else []
    )
    names = (mod.OURS, mod.BATCH, mod.LEAN, f"{mod.BATCH}, checkpoint_every=2", *kernel, mod.EQX)
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [(cell, name) for cell in ("gru", "lstm") for name in names]
    # the same Equinox cells, switched by from_eqx_cell (vmapped, called once, segments, the scans): the same loss
    for i in (0, len(names)):
        losses = [float(rows[j][-2]) for j in range(i, i + len(names))]
        assert max(losses) - min(losses) < 1e-4, losses


@pytest.mark.bench
def test_precision_benchmark_quick():
    _load("bptt_speed", "benchmarks/bptt_speed.py")
    _load("gate_blocks", "benchmarks/gate_blocks.py")
    mod = _load("precision_bench", "benchmarks/precision.py")
    report = mod.main(["--quick", "--cell", "gru"])
    rows = {line.split("|")[2].strip(): line.split("|") for line in report.splitlines() if line.startswith("| (12")}
    assert set(rows) == {"bptt float32", "bptt bfloat16", "grad(loss) float32", "grad(loss) bfloat16"}
    assert float(rows["grad(loss) float32"][-2]) < 1e-5  # the same float32 gradients
    assert 1e-4 < float(rows["bptt bfloat16"][-2]) < 0.05  # bfloat16's rounding: present, and small
    assert "## Summary: bptt bfloat16 over bptt float32" in report


def test_half_blocks_quick():
    _load("bptt_speed", "benchmarks/bptt_speed.py")
    _load("gate_blocks", "benchmarks/gate_blocks.py")
    mod = _load("half_blocks", "benchmarks/half_blocks.py")
    report = mod.main(["--quick", "--cell", "lstm", "--blocks", "4,2"])  # raises where a loss differs
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| lstm | (12, 3, 5, 6, 7)")]
    assert [r[3].strip() for r in rows] == [
        "float32, default",
        "bfloat16, auto (C = 3)",
        "bfloat16, C = 4",
        "bfloat16, C = 2",
    ]
    assert float(rows[0][5]) == 1.0 and float(rows[0][7]) == 1.0  # float32's own row
    assert all(float(r[5]) > 0 and float(r[7]) > 0 for r in rows)


def test_train_profile_quick():
    _load("train_speed", "benchmarks/train_speed.py")
    mod = _load("train_profile", "benchmarks/train_profile.py")
    rates = mod.main(["--quick", "--cell", "gru", "--rounds", "2", "--steps", "2"])
    assert len(rates) == 2 and all(r > 0 for r in rates)


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.bench
def test_gate_blocks_benchmark_quick(tmp_path):
    """The script checks that both formulations of the gated forward scan give the same states
    (it raises otherwise) before it times them."""
    mod = _load("gate_blocks", "benchmarks/gate_blocks.py")
    out = tmp_path / "blocks.md"
    report = mod.main(["--quick", "--rounds", "1", "--out", str(out)])
    assert out.read_text() == report
    assert "| GRU | (12, 3, 6) |" in report and "| LSTM | (12, 3, 6) |" in report


@pytest.mark.bench
def test_gated_memory_benchmark_quick(tmp_path):
    """Every bptt setting's gradients are checked against the default's (the script raises otherwise)
    before it reports compiled temp memory and times."""
    mod = _load("gated_memory", "benchmarks/gated_memory.py")
    out = tmp_path / "memory.md"
    report = mod.main(["--quick", "--out", str(out)])
    assert out.read_text().strip() == report.strip()
    for cell in ("GRU", "LSTM"):
        assert f"## {cell}" in report
    rows = [line for line in report.splitlines() if line.startswith("| (12, 3, 5, 6, 7)")]
    assert len(rows) == 2 * 4  # two cells x (default, recompute, two smaller blocks)
    assert all(r.split("|")[7].strip().endswith("x") for r in rows)  # each timed against the default
    # A bad round count is refused before anything is compiled or written (argparse: exit 2).
    bad = tmp_path / "bad.md"
    with pytest.raises(SystemExit) as e:
        mod.main(["--quick", "--rounds", "0", "--out", str(bad)])
    assert e.value.code == 2 and not bad.exists()


@pytest.mark.bench
def test_tune_speed_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path / "users-cache"))
    mod = _load("tune_speed", "benchmarks/tune_speed.py")
    report = mod.main(["--quick", "--cell", "gru", "--budget", "5"])
    first, budgeted = report.split("Under `max_memory`")
    rows = [line.split("|") for line in first.splitlines() if line.startswith("| gru | (")]
    assert len(rows) == 2
    assert all(float(r[-2]) < 1e-4 for r in rows)  # every plan's gradient = jax.grad's
    assert not (tmp_path / "users-cache").exists()  # tuned in a cache of its own
    assert "| gru | " in report.split("geometric mean")[1]
    budget_rows = [line.split("|") for line in budgeted.splitlines() if line.startswith("| gru | (")]
    assert len(budget_rows) == 2 and all(len(r) == 13 for r in budget_rows)  # untuned, then tuned under it
    layers = mod.main(["--quick", "--layers", "--cell", "lstm", "--budget", "2"])  # rnn_states' plans
    rows = [line.split("|") for line in layers.splitlines() if line.startswith("| lstm | (")]
    assert len(rows) == 1 and float(rows[0][-2]) < 1e-4  # = grad="autodiff"'s gradient
    assert not (tmp_path / "users-cache").exists()


@pytest.mark.bench
def test_scaling_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path / "cache"))
    mod = _load("scaling", "benchmarks/scaling.py")
    report = mod.main(["--quick", "--cell", "lstm", "--plot", str(tmp_path / "s.png")])
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| lstm |")]
    assert len(rows) == 6  # 2 lengths x 3 contenders, each timed
    assert all(r[-2].strip() != "-" and float(r[-2]) < 1e-4 for r in rows)  # gradients = the budgeted call's
    assert (tmp_path / "s.png").stat().st_size > 0
    args = ["--quick", "--cell", "gru", "--bidirectional", "--nested", "--compile-only", "--lengths", "200"]
    rows = [line.split("|") for line in mod.main(args).splitlines() if line.startswith("| gru |")]
    assert [r[3].strip() for r in rows][
        2
    ] == "bptt checkpoint_every=(40, 5)"  # the nested contender (T^(2/3), its sqrt)
    assert all(r[4].strip() == "compiled only" and "B" in r[6] for r in rows)  # temp memory, nothing run


@pytest.mark.bench
def test_step_profile_quick():
    mod = _load("step_profile", "benchmarks/step_profile.py")
    report = mod.main(["--quick", "--cell", "lstm", "--rounds", "1"])
    (row,) = [line.split("|") for line in report.splitlines() if line.startswith("| 12, 3, 5, 6 |")]
    loops = [part.strip() for part in row[-2].split(",")]
    assert len(loops) == 2  # the forward and the reverse loop, each with its one matmul
    assert all(loop.endswith("(1)") and int(loop.split()[0]) > 1 for loop in loops)


@pytest.mark.bench
def test_xla_options_quick():
    mod = _load("xla_options", "benchmarks/xla_options.py")
    before = os.environ.get("BPTT_JAX_PLAN_CACHE")
    report = mod.main(["--quick", "--cell", "gru"])
    assert os.environ.get("BPTT_JAX_PLAN_CACHE") == before  # the cache switched off for its run only
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| ") and "(12, 3" not in line]
    assert [r[1].strip() for r in rows] == ["default", "no XNNPACK (Eigen matmuls)", "single-threaded Eigen"]
    assert all(float(r[2]) > 0 for r in rows)  # each timed, its gradients checked against the default's


@pytest.mark.bench
def test_lstm_forms_quick():
    mod = _load("lstm_forms", "benchmarks/lstm_forms.py")
    before = os.environ.get("BPTT_JAX_PLAN_CACHE")
    report = mod.main(["--quick", "--rounds", "1"])
    (row,) = [line.split("|") for line in report.splitlines() if line.startswith("| (12, 3")]
    assert len(row) == 7 and all(float(r) > 0 for r in row[2:6])  # 2 forms x 2 gate settings, each checked
    assert mod.lstm._gates is not mod.fused_gates and mod.lstm.reverse is not mod.in_loop_reverse  # restored
    assert os.environ.get("BPTT_JAX_PLAN_CACHE") == before


@pytest.mark.bench
def test_scaling_sweeps_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("BPTT_JAX_CACHE_DIR", str(tmp_path / "cache"))
    mod = _load("scaling", "benchmarks/scaling.py")
    report = mod.main(
        ["--quick", "--cell", "gru", "--no-lengths", "--batches", "1,3", "--widths", "4", "--sweep-t", "16"]
    )
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| gru |")]
    assert [(r[2].strip()) for r in rows] == ["1"] * 3 + ["3"] * 3 + ["4"] * 3  # B 1, 3 then N1 4, 3 contenders each
    assert all(r[-2].strip() != "-" and float(r[-2]) < 1e-4 for r in rows)  # gradients = the budgeted call's


@pytest.mark.bench
def test_bidir_batched_quick():
    mod = _load("bidir_batched", "benchmarks/bidir_batched.py")
    report = mod.main(["--quick", "--rounds", "1", "--cell", "lstm"])  # raises when the two ways differ
    (row,) = [line.split("|") for line in report.splitlines() if line.startswith("| lstm |")]
    assert float(row[4]) > 0 and float(row[5]) > 0


@pytest.mark.bench
def test_states_memory_quick():
    mod = _load("states_memory", "benchmarks/states_memory.py")
    report = mod.main(["--quick", "--rounds", "1", "--cell", "gru"])
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| gru |")]
    names = [r[3].strip() for r in rows]
    assert names == ["default", "gates='recompute'", "checkpoint_every=4", 'grad="autodiff"'], names
    assert all(float(r[-2]) < 1e-5 for r in rows)  # every plan's gradients = the default's


@pytest.mark.bench
def test_native_kernel_quick(tmp_path):
    mod = _load("native_kernel", "benchmarks/native_kernel.py")
    why = mod.unavailable()
    if why is not None:  # a machine without g++ skips
        pytest.skip(why)
    report = mod.main(["--quick", "--rounds", "1", "--out", str(tmp_path / "n.md")])  # raises where they differ
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| (12, 3, 5, 6)")]
    assert len(rows) == 3 and all(float(v) > 0 for row in rows for v in row[2:7]), rows  # Elman, LSTM, GRU
    calls = [line.split("|") for line in report.splitlines() if line.startswith("| (12, 3, 5, 6, 7)")]
    assert len(calls) == 3, calls
    assert all(float(v) > 0 for c in calls for v in c[2:4]) and all(float(c[-2]) < 1e-4 for c in calls), calls


def test_native_parts_quick():
    mod = _load("native_parts", "benchmarks/native_parts.py")
    if mod.native.unavailable() is not None:  # a machine without g++ skips
        pytest.skip(mod.native.unavailable())
    report = mod.main(["--quick", "--no-torch", "--cell", "gru"])
    rows = [line.split("|")[2:-1] for line in report.splitlines() if line.startswith("| (12, 3, 5, 6)")]
    assert len(rows) == 2 and all(len(r) == 12 for r in rows), rows  # ms, then cores busy
    no_dx = (5, 9)  # reverse_dx (and with the cache that keeps V_n): not at so few rows
    assert all(r[i].strip() == "-" for r in rows for i in no_dx), rows
    times, busy = ([float(v) for i, v in enumerate(r) if i not in no_dx] for r in rows)
    # cores busy: processor time over wall time, a number per part (no bound: at these tiny calls the
    # process's other threads make it noise, e.g. 3.09 on two cores in one run)
    assert all(v > 0 for v in times) and all(np.isfinite(v) and v >= 0 for v in busy), rows


def test_vmapped_layer_quick():
    pytest.importorskip("equinox")
    pytest.importorskip("flax")  # eqx_speed.py shares nnx_speed.py's timing loop
    _load("nnx_speed", "benchmarks/nnx_speed.py")
    _load("eqx_speed", "benchmarks/eqx_speed.py")
    mod = _load("vmapped_layer", "benchmarks/vmapped_layer.py")
    switch = mod.sequence._vmap_innermost
    report = mod.main(["--quick", "--rounds", "1"])
    rows = [line.split("|") for line in report.splitlines() if line.startswith(("| gru", "| lstm"))]
    assert len(rows) == 12, rows  # six contenders per cell
    assert all(float(r[-2]) < 1e-4 for r in rows), rows  # every contender's dX is the Equinox cell's
    assert mod.sequence._vmap_innermost is switch and mod.native.KERNEL_SUM_ROWS == 1024  # switches restored


def test_peak_buffers_quick(tmp_path):
    pytest.importorskip("equinox")
    pytest.importorskip("flax")  # eqx_speed.py shares nnx_speed.py's timing loop
    _load("nnx_speed", "benchmarks/nnx_speed.py")
    _load("eqx_speed", "benchmarks/eqx_speed.py")
    mod = _load("peak_buffers", "benchmarks/peak_buffers.py")
    values = mod.temp_values(
        "allocation 0: size 8, parameter 0:\n value: <1 p @0> (size=8,offset=0): f32[2]\n"
        "allocation 1: size 96, preallocated-temp:\n value: <2 a.1 @0> (size=64,offset=0): f32[16]\n"
        " value: <3 b{0} @0> (size=32,offset=64): f32[8]\n"
    )
    assert values == [("a.1", 64, 0), ("b{0}", 32, 64)]  # the temp allocation's values only
    out = tmp_path / "peak.md"  # a process of its own: XLA reads the dump flags when it starts
    env = {**os.environ, "XLA_FLAGS": ""}
    run = [sys.executable, str(ROOT / "benchmarks/peak_buffers.py"), "--quick", "--min-mib", "0", "--out", str(out)]
    subprocess.run(run, check=True, env=env, capture_output=True, timeout=300)
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| offset")]
    assert "temp memory" in report and rows and all(float(r.split("|")[2]) >= 0 for r in rows), report


def test_sums_beside_quick():
    mod = _load("sums_beside", "benchmarks/sums_beside.py")
    if mod.native.unavailable() is not None:  # a machine without g++ skips
        pytest.skip(mod.native.unavailable())
    report = mod.main(["--quick", "--rounds", "1", "--cell", "elman", "--cell", "lstm"])  # raises where grads differ
    rows = [line.split("|") for line in report.splitlines() if line.startswith(("| elman |", "| lstm |"))]
    assert len(rows) == 2 and all(r[-2].strip() == "yes" for r in rows), rows
    assert all(float(v) > 0 for r in rows for v in r[3:7]), rows


def test_gru_vn_quick():
    mod = _load("gru_vn", "benchmarks/gru_vn.py")
    if mod.native.unavailable() is not None:  # a machine without g++ skips
        pytest.skip(mod.native.unavailable())
    report = mod.main(["--quick", "--rounds", "1"])  # raises where the gradients differ
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| (6, 64, 4, 210, 4)")]
    assert len(rows) == 1 and rows[0][2].strip() == "two" and rows[0][3].strip() == "yes", rows
    assert float(rows[0][8].strip().rstrip("x")) > 1.0, rows  # V_n kept: a wider cache, more temp memory


def test_gemm_tn_rates_quick():
    mod = _load("gemm_tn_rates", "benchmarks/gemm_tn_rates.py")
    if mod.native.unavailable() is not None:  # a machine without g++ skips
        pytest.skip(mod.native.unavailable())
    report = mod.main([])
    rows = [line.split("|") for line in report.splitlines() if line.startswith(("| gemm_tn |", "| packed gemm |"))]
    assert len(rows) == 9 and all(float(r[3]) > 0 for r in rows), rows
    parts = [line.split("|") for line in report.splitlines() if line.startswith("| lstm ")]
    assert len(parts) == 2 and all(float(r[3]) > 0 for r in parts), parts


def test_native_blocks_quick():
    from bptt_jax.core import native

    if native.unavailable() is not None:  # a machine without g++ skips
        pytest.skip(native.unavailable())
    mod = _load("native_blocks", "benchmarks/native_blocks.py")
    report = mod.main(["--quick", "--rounds", "1", "--cell", "lstm"])  # raises where gradients differ
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| (12, 3, 5, 6, 7)")]
    assert [r[2].strip() for r in rows][:2] == ["scans, rules", "native, scan blocks"], rows
    assert all(float(r[3]) > 0 for r in rows), rows


def test_segment_gates_quick():
    mod = _load("segment_gates", "benchmarks/segment_gates.py")
    report = mod.main(["--quick", "--rounds", "1", "--cell", "lstm"])
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| lstm |")]
    assert [r[4].strip() for r in rows[:3]] == [
        "segments, gates kept",
        "segments, gates recomputed",
        "default (no segments)",
    ]
    assert len(rows) == 6 and all(float(r[-2]) < 1e-5 for r in rows)  # every gradient = the default's
    assert rows[0][5] != rows[1][5]  # the two segment programs were traced apart (their temp memory differs)


@pytest.mark.bench
def test_matmul_rates_quick(tmp_path):
    mod = _load("matmul_rates", "benchmarks/matmul_rates.py")
    report = mod.main(["--quick", "--rounds", "1", "--out", str(tmp_path / "m.md")])
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| (12, 3, 5, 6, 7)")]
    assert [r[2].strip() for r in rows] == ["step forward", "step reverse", "projection", "weight grad"], rows
    assert all(float(r[4]) > 0 for r in rows)  # XLA's rate, every kind
    if "not measured" not in report:  # the harness compiled (g++ at hand): the kernel's per-step rates
        assert all(float(r[7]) > 0 and float(r[8]) > 0 for r in rows[:2]), rows
