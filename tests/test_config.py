import dataclasses
from pathlib import Path

import pytest

from bptt_jax.command.config import Config, ConfigError, apply_overrides, load_config, to_toml

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.toml"))


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "[optim]\nlearning_rte = 0.1\n",
            r"c.toml: \[optim\]: unknown key 'learning_rte' \(did you mean 'learning_rate'\?\); allowed: \[",
        ),
        (
            "[optimizer]\nname = 'adam'\n",
            r"c.toml: unknown key 'optimizer' \(did you mean 'optim'\?\); allowed: \['data', 'model', 'optim', 'output', 'train'\]",
        ),
        ("[optim]\nlearning_rate = 'fast'\n", r"c.toml: optim.learning_rate: expected a number, got 'fast' \(str\)"),
        ("[train]\nsteps = 1.5\n", r"c.toml: train.steps: expected an int, got 1.5 \(float\)"),
        ("[model]\nbidirectional = 1\n", r"c.toml: model.bidirectional: expected true or false, got 1 \(int\)"),
        ("[model]\nhidden_sizes = 64\n", r"c.toml: model.hidden_sizes: expected a non-empty list of ints, got 64"),
        (
            "[optim]\nname = 'adamw'\n",
            r"c.toml: optim.name: got 'adamw'; allowed: \['sgd', 'momentum', 'adam', 'adagrad', 'rmsprop'\]",
        ),
        ("[optim]\nlearning_rate = -1.0\n", r"c.toml: optim.learning_rate: expected a value > 0, got -1.0"),
        ("[train]\ninput_dropout = 1.0\n", r"c.toml: train.input_dropout: expected a value in \[0, 1\), got 1.0"),
        ("[model]\nhidden_sizes = [8, 0]\n", r"c.toml: model.hidden_sizes: every layer size must be > 0, got \[8, 0\]"),
        (
            "[model]\nbidirectional = true\n[data]\ntask = 'text'\n",
            r"c.toml: model.bidirectional = true cannot be used with data.task = 'text'",
        ),
        ("[train\nsteps = 1\n", r"c.toml: not valid TOML"),
        ("[train]\nunroll = 0\n", r"c.toml: train.unroll: expected \"auto\" or a positive int, got '0'"),
        ("[train]\nunroll = 'fast'\n", r"c.toml: train.unroll: expected \"auto\" or a positive int, got 'fast'"),
        (
            "[model]\ncompute_dtype = 'float16'\n",
            r"c.toml: model.compute_dtype: 'float16' is not trained by the command: without loss scaling .*use 'bfloat16'",
        ),
        (
            "[model]\ncompute_dtype = 'half'\n",
            r"c.toml: model.compute_dtype: got 'half'; allowed: \['float32', 'bfloat16', 'float16'\]",
        ),
        (
            "[train]\nmax_memory = 'lots'\n",
            r"c.toml: train.max_memory: max_memory: expected bytes \(an int\) or a size such as '512MiB'",
        ),
        (
            "[train]\nmax_memory = '1GiB'\ngrad = 'autodiff'\n",
            r"c.toml: train.max_memory applies to train.grad = 'bptt'",
        ),
        (
            "[train]\nrecurrence = 'nativ'\n",
            r"c.toml: train.recurrence: got 'nativ'; allowed: \['auto', 'scan', 'pallas', 'native'\]",
        ),
    ],
)
def test_config_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.toml: no such config file"):
        load_config(tmp_path / "nope.toml")


def test_overrides_are_type_checked(tmp_path):
    path = _write(tmp_path, "[optim]\nlearning_rate = 0.1\n")
    cfg = load_config(path, ["optim.learning_rate=0.01", "model.hidden_sizes=[4, 5]", "data.task=adding"])
    assert cfg.optim.learning_rate == 0.01 and cfg.model.hidden_sizes == (4, 5) and cfg.data.task == "adding"
    with pytest.raises(ConfigError, match=r"optim.learning_rate: expected a number, got 'abc' \(str\)"):
        load_config(path, ["optim.learning_rate=abc"])
    with pytest.raises(ConfigError, match=r"unknown key 'stpes' \(did you mean 'steps'\?\)"):
        load_config(path, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(path, ["steps3"])


def test_unroll_auto_or_an_int(tmp_path):
    from bptt_jax.command.runner import _unroll

    path = _write(tmp_path, "[train]\nsteps = 1\n")
    assert _unroll(load_config(path)) is None  # "auto": the library picks by backend
    assert _unroll(load_config(path, ["train.unroll=4"])) == 4
    assert _unroll(load_config(_write(tmp_path, "[train]\nunroll = 2\n"))) == 2


def test_resolved_config_round_trips(tmp_path):
    cfg = apply_overrides(Config(), ["train.steps=7", "output.dir=x/y", "model.hidden_sizes=[3,4]"])
    assert load_config(_write(tmp_path, to_toml(cfg))) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_every_key_is_commented(path):
    load_config(path)
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key = line.split("=", 1)[0].strip()
            assert "#" in line, f"{path.name}: key {key!r} has no comment"


def test_every_config_key_is_documented():
    """config.HELP (printed by the generated config reference) has a line for every field, and no others."""
    from bptt_jax.command import config

    fields = {(name, f.name) for name, cls in config._SECTION_TYPES.items() for f in dataclasses.fields(cls)}
    assert set(config.HELP) == fields
    assert all(config.HELP[k].strip() for k in fields)
