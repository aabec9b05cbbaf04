"""The README's Python examples run as written, and its two commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    assert float(abs(namespace["same"].readout.w2 - namespace["grads"].readout.w2).max()) < 1e-5


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [l for l in first.splitlines() if l and not l.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("bptt-jax run configs/char_lm.toml --out runs/char_lm")
    # the suite over both cores, then the timing-sensitive multi-process tests alone; CI runs the same
    assert commands[1].endswith('python -m pytest -q -n 2 -m "not serial" tests && python -m pytest -q -m serial tests')
    ci = (ROOT / ".ci/run").read_text()
    assert 'run_pytest -n 2 -m "not serial" tests' in ci and "run_pytest -m serial tests" in ci
