"""TOML config files -> frozen dataclasses, with one clear error per mistake.

Sections: [model], [data], [optim], [train], [output]. Every key has a type, a default and, where
it matters, a set of allowed values. ``load_config(path, overrides)`` reads a file with the standard
library's ``tomllib`` and applies ``section.key=value`` overrides (values parsed as TOML, bare words
as strings), checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file, the key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    hidden_sizes: tuple[int, ...] = (256,)
    activation: str = "tanh"
    bidirectional: bool = False
    merge: str = "concat"
    init: str = "uniform"
    init_scale: float = 1.0
    cell: str = "elman"
    forget_bias: float = 0.0
    compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = "text"
    corpus: str = "pydoc"
    path: str = ""
    seq_len: int = 64
    batch_size: int = 32
    validation_fraction: float = 0.1
    mask_prob: float = 0.15
    adding_length: int = 150
    test_size: int = 1000


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"
    learning_rate: float = 2e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    momentum: float = 0.9
    eps: float = 1e-8
    initial_accumulator: float = 0.0
    clip: str = "global_norm"
    clip_value: float = 1.0
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000
    time_limit_s: float = 0.0
    stop_below: float = 0.0
    seed: int = 0
    grad: str = "bptt"
    stateful: bool = True
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    log_every: int = 100
    eval_every: int = 500
    checkpoint_every: int = 500
    max_nonfinite: int = 10
    unroll: str = "auto"
    recurrence: str = "auto"
    devices: str = "1"
    max_memory: str = ""
    tune: bool = False
    peer_timeout_s: int = 60
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    sample_length: int = 300
    temperature: float = 0.8
    plots: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "output": OutputConfig,
}

# What each key means, one line per key (the generated config reference prints it; a test checks
# that every field has an entry).
HELP = {
    ("model", "hidden_sizes"): "N1 per stacked layer, bottom first",
    ("model", "activation"): "f1, the hidden activation",
    ("model", "bidirectional"): "a forward and a reverse net per layer (not for language models)",
    ("model", "merge"): "how the two directions' states meet at each t (bidirectional only)",
    ("model", "init"): "weight initialisation: uniform as PyTorch, orthogonal W11, identity W11 (IRNN), normal",
    ("model", "init_scale"): "scale of the orthogonal / identity / normal initialisations",
    ("model", "cell"): 'the recurrent cell: "elman" (the lecture notes\' layer), "gru" or "lstm"',
    ("model", "forget_bias"): "the LSTM's forget-gate bias at initialisation (0 as PyTorch; 1 is common)",
    ("model", "compute_dtype"): "float32, or bfloat16: mixed precision (16-bit matmuls and stored states, "
    "float32 parameters, sums and carries); float16 is refused (no loss scaling: use bfloat16)",
    ("data", "task"): "text (next character), adding (the adding problem), infill (masked characters), "
    "arrays (your own sequences: a .npz file in data.path)",
    ("data", "corpus"): "pydoc (built in), stdlib (Python's .py sources) or file (data.path)",
    ("data", "path"): 'a UTF-8 text file when corpus = "file"; the .npz file of the arrays task',
    ("data", "seq_len"): "T, steps per chunk (characters per truncated-BPTT chunk for text; arrays: from the file)",
    ("data", "batch_size"): "B, the global batch (split over devices)",
    (
        "data",
        "validation_fraction",
    ): "share of the text held out at its end (arrays: of the sequences, a fixed random draw)",
    ("data", "mask_prob"): "infill: share of characters masked (at least one per window)",
    ("data", "adding_length"): "adding: the sequence length T",
    ("data", "test_size"): "adding / infill: fixed test sequences",
    ("optim", "name"): "the optimizer",
    ("optim", "learning_rate"): "peak step size",
    ("optim", "schedule"): "learning-rate schedule over train.steps",
    ("optim", "warmup_steps"): "linear warm-up steps (warmup_* schedules)",
    ("optim", "momentum"): "momentum coefficient (momentum, rmsprop)",
    ("optim", "eps"): "numerical floor of adaptive optimizers",
    ("optim", "initial_accumulator"): "adagrad's starting accumulator",
    ("optim", "clip"): "gradient clipping: none, by global norm, or element-wise",
    ("optim", "clip_value"): "the max global norm, or the max |entry|",
    ("optim", "weight_decay"): "decoupled (AdamW) for adam, L2 otherwise",
    ("train", "steps"): "number of updates (schedules decay over them)",
    ("train", "time_limit_s"): "wall-clock budget in seconds (0 = none)",
    ("train", "stop_below"): "stop once an evaluation's loss is below this (0 = never)",
    ("train", "seed"): "fixes weights, data order and dropout masks",
    ("train", "grad"): "bptt (the explicit reverse scans) or autodiff (jax.grad)",
    ("train", "stateful"): "carry the hidden state across chunks (truncated BPTT)",
    ("train", "input_dropout"): "probability of dropping an input entry",
    ("train", "output_dropout"): "probability of dropping an entry of the top states before the readout",
    ("train", "log_every"): "steps between metrics.jsonl rows",
    ("train", "eval_every"): "steps between evaluations (best.ckpt keeps the best)",
    ("train", "checkpoint_every"): "steps between last.ckpt writes",
    ("train", "max_nonfinite"): "stop after this many skipped (NaN/inf) updates in a row",
    ("train", "unroll"): 'scan steps per loop iteration; "auto": 1 on a CPU, 8 on a GPU (measured)',
    (
        "train",
        "recurrence",
    ): "auto (lax.scan; the Pallas kernels on a GPU for float32 layers of N1 <= 64), scan, pallas, or native "
    "(the cells' compiled kernel on a CPU, float32; needs a C++ compiler)",
    ("train", "devices"): '"1", a count, or "all": data-parallel over devices (batch split along B)',
    ("train", "max_memory"): 'a budget for the gradient program\'s temp memory per device ("512MiB", "2GiB"; '
    '"" = none): the fastest plan that fits (bptt\'s max_memory)',
    ("train", "tune"): "before training, measure the explicit BPTT's plans for this run's shapes on this machine "
    "and cache the fastest (bptt-jax tune; about a minute, once per machine and shape)",
    ("train", "coordinator_address"): "multi-host: host:port of process 0 (or env BPTT_JAX_COORDINATOR)",
    ("train", "num_processes"): "multi-host: number of processes (or env BPTT_JAX_NUM_PROCESSES)",
    ("train", "process_id"): "multi-host: this process's index (or env BPTT_JAX_PROCESS_ID)",
    ("train", "peer_timeout_s"): "several processes: a peer silent for half of this is lost and the others stop "
    "(JAX's own heartbeat gets 3x this)",
    ("output", "dir"): "default output directory (--out overrides)",
    ("output", "sample_length"): "characters sampled from the best checkpoint at the end (text)",
    ("output", "temperature"): "sampling temperature",
    ("output", "plots"): "write loss.png and dh_norms.png",
}
# Allowed values that are not a choice, a positive number or a fraction, in words.
ALLOWED_TEXT = {
    ("model", "hidden_sizes"): "each > 0",
    ("train", "devices"): '`"all"` or a positive int as a string',
    ("train", "unroll"): '`"auto"` or a positive int',
    ("train", "max_memory"): '`""` or a size: bytes, or a number with KiB, MiB, GiB, KB, MB, GB',
    ("train", "time_limit_s"): ">= 0",
    ("train", "stop_below"): ">= 0",
    ("output", "sample_length"): ">= 0",
    ("optim", "warmup_steps"): ">= 0",
    ("optim", "weight_decay"): ">= 0",
    ("optim", "eps"): ">= 0",
    ("optim", "initial_accumulator"): ">= 0",
    ("optim", "momentum"): ">= 0",
    ("optim", "clip_value"): ">= 0",
}

CHOICES = {
    ("model", "activation"): ("tanh", "relu", "sigmoid", "identity"),
    ("model", "merge"): ("concat", "sum"),
    ("model", "init"): ("uniform", "orthogonal", "identity", "normal"),
    ("model", "cell"): ("elman", "gru", "lstm"),
    ("model", "compute_dtype"): ("float32", "bfloat16", "float16"),
    ("data", "task"): ("text", "adding", "infill", "arrays"),
    ("data", "corpus"): ("pydoc", "stdlib", "file"),
    ("optim", "name"): ("sgd", "momentum", "adam", "adagrad", "rmsprop"),
    ("optim", "schedule"): ("constant", "cosine", "warmup_cosine", "warmup_constant"),
    ("optim", "clip"): ("none", "global_norm", "value"),
    ("train", "grad"): ("bptt", "autodiff"),
    ("train", "recurrence"): ("auto", "scan", "pallas", "native"),
}
POSITIVE = {
    ("data", "seq_len"),
    ("data", "batch_size"),
    ("data", "adding_length"),
    ("data", "test_size"),
    ("optim", "learning_rate"),
    ("train", "steps"),
    ("train", "log_every"),
    ("train", "eval_every"),
    ("train", "checkpoint_every"),
    ("train", "max_nonfinite"),
    ("output", "temperature"),
    ("train", "num_processes"),
    ("train", "peer_timeout_s"),
}
FRACTIONS = {
    ("data", "validation_fraction"),
    ("data", "mask_prob"),
    ("train", "input_dropout"),
    ("train", "output_dropout"),
}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list of ints"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false"}[tp]


def _coerce(where: str, tp, value):
    """Checks value against type tp; returns it converted (list -> tuple, int -> float)."""
    if typing.get_origin(tp) is tuple:
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            return tuple(value)
        raise ConfigError(f"{where}: expected a non-empty list of ints, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. train.devices = 4
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _check_value(where: str, section: str, key: str, value) -> None:
    if (section, key) == ("model", "compute_dtype") and value == "float16":
        raise ConfigError(
            f"{where}: 'float16' is not trained by the command: without loss scaling its gradients underflow "
            "(float16 stops at 6e-8); use 'bfloat16', which has float32's range"
        )
    if (section, key) in CHOICES and value not in CHOICES[(section, key)]:
        raise ConfigError(f"{where}: got {value!r}; allowed: {list(CHOICES[(section, key)])}")
    if (section, key) in POSITIVE and not value > 0:
        raise ConfigError(f"{where}: expected a value > 0, got {value!r}")
    if (section, key) in FRACTIONS and not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}: expected a value in [0, 1), got {value!r}")
    if (section, key) == ("model", "hidden_sizes") and any(v <= 0 for v in value):
        raise ConfigError(f"{where}: every layer size must be > 0, got {list(value)}")
    if (section, key) == ("train", "unroll") and not (value == "auto" or (value.isdigit() and int(value) > 0)):
        raise ConfigError(f'{where}: expected "auto" or a positive int, got {value!r}')
    if (section, key) == ("train", "max_memory") and value != "":
        from bptt_jax.core.budget import parse_memory

        try:
            parse_memory(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    if (section, key) == ("train", "devices") and not (value == "all" or (value.isdigit() and int(value) > 0)):
        raise ConfigError(f'{where}: expected "all" or a positive int, got {value!r}')
    if (
        section == "optim"
        and key in ("warmup_steps", "weight_decay", "eps", "initial_accumulator", "momentum", "clip_value")
        and value < 0
    ):
        raise ConfigError(f"{where}: expected a value >= 0, got {value!r}")
    if (section, key) in (
        ("train", "time_limit_s"),
        ("train", "stop_below"),
        ("output", "sample_length"),
    ) and value < 0:
        raise ConfigError(f"{where}: expected a value >= 0, got {value!r}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(where: str, key: str, options) -> ConfigError:
    return ConfigError(f"{where}: unknown key {key!r}{_suggest(key, options)}; allowed: {sorted(options)}")


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Builds a Config from a parsed TOML dict; ``source`` names the file in errors."""
    sections = {}
    for name, body in raw.items():
        if name not in _SECTION_TYPES:
            raise _unknown(source, name, _SECTION_TYPES)
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys, got {body!r}")
        sections[name] = body
    built = {}
    for name, cls in _SECTION_TYPES.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in sections.get(name, {}).items():
            where = f"{source}: {name}.{key}"
            if key not in fields:
                raise _unknown(f"{source}: [{name}]", key, fields)
            value = _coerce(where, hints[key], value)
            _check_value(where, name, key, value)
            values[key] = value
        built[name] = cls(**values)
    cfg = Config(**built)
    _check_combination(cfg, source)
    return cfg


def _check_combination(cfg: Config, source: str) -> None:
    if cfg.model.cell != "elman" and cfg.model.activation != "tanh":
        raise ConfigError(
            f"{source}: model.activation = {cfg.model.activation!r} applies to the Elman cell only; the "
            f"{cfg.model.cell} cell has its own gate activations (leave model.activation at 'tanh')"
        )
    if cfg.train.max_memory and cfg.train.grad != "bptt":
        raise ConfigError(f"{source}: train.max_memory applies to train.grad = 'bptt' (the explicit BPTT's plans)")
    if cfg.model.forget_bias != 0.0 and cfg.model.cell != "lstm":
        raise ConfigError(f"{source}: model.forget_bias applies to model.cell = 'lstm' only, got {cfg.model.cell!r}")
    if cfg.model.cell != "elman" and cfg.model.init == "identity":
        raise ConfigError(f"{source}: model.init = 'identity' (the IRNN) is for the Elman cell, got {cfg.model.cell!r}")
    if cfg.data.task == "text" and cfg.model.bidirectional:
        raise ConfigError(
            f"{source}: model.bidirectional = true cannot be used with data.task = 'text' "
            "(a language model must not see the future); use task 'infill'"
        )
    if cfg.data.task == "arrays" and not cfg.data.path:
        raise ConfigError(f"{source}: data.path must name a .npz file of sequences when data.task = 'arrays'")
    if cfg.data.corpus == "file" and not cfg.data.path:
        raise ConfigError(f"{source}: data.path must name a UTF-8 file when data.corpus = 'file'")


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); value parsed as TOML, else kept as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. optim.learning_rate=0.01")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()
    return section, key, value


def load_config(path, overrides=()) -> Config:
    """Reads a TOML config and applies ``section.key=value`` overrides. Raises ConfigError."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = from_dict(raw, str(path))
    return apply_overrides(cfg, overrides, str(path))


def apply_overrides(cfg: Config, overrides, source: str = "--set") -> Config:
    raw = to_dict(cfg)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in raw:
            raise _unknown(f"--set {text!r}", section, raw)
        if key not in raw[section]:
            raise _unknown(f"--set {text!r}: [{section}]", key, raw[section])
        raw[section][key] = value
    return from_dict(raw, f"{source} with --set overrides" if overrides else source)


def to_dict(cfg: Config) -> dict:
    out = {}
    for name in _SECTION_TYPES:
        section = dataclasses.asdict(getattr(cfg, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    return out


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (round-trips through load_config)."""
    lines = []
    for name, section in to_dict(cfg).items():
        lines.append(f"[{name}]")
        for k, v in section.items():
            if isinstance(v, bool):
                s = "true" if v else "false"
            elif isinstance(v, str):
                s = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            elif isinstance(v, list):
                s = "[" + ", ".join(str(i) for i in v) + "]"
            else:
                s = repr(v)
            lines.append(f"{k} = {s}")
        lines.append("")
    return "\n".join(lines)
