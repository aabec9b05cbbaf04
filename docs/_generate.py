"""Writes the reference pages that must not drift from the code: the ``bptt-jax`` command (from its
argparse parser) and every config key (from the config dataclasses and their checks)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from bptt_jax.command import cli, config


def _type(cls, name) -> str:
    return config._type_name(typing.get_type_hints(cls)[name])


def _allowed(section: str, key: str, field) -> str:
    if (section, key) in config.CHOICES:
        return ", ".join(f"`{v}`" for v in config.CHOICES[(section, key)])
    if (section, key) in config.POSITIVE:
        return "> 0"
    if (section, key) in config.FRACTIONS:
        return "[0, 1)"
    return config.ALLOWED_TEXT.get((section, key), "any")


def config_page() -> str:
    lines = [
        "# Config keys",
        "",
        "Generated from `bptt_jax.command.config` when the site is built: every section's dataclass gives the keys,",
        "types and defaults; the checks give the allowed values; `config.HELP` the meaning.",
        "",
    ]
    for section, cls in config._SECTION_TYPES.items():
        lines += [f"## `[{section}]`", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(
                f"| `{f.name}` | {_type(cls, f.name)} | `{default!r}` | {_allowed(section, f.name, f)} | "
                f"{config.HELP[(section, f.name)]} |"
            )
        lines.append("")
    return "\n".join(lines)


def _actions(parser: argparse.ArgumentParser):
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        yield a


def cli_page() -> str:
    parser = cli.build_parser()
    lines = [
        "# The `bptt-jax` command",
        "",
        "Generated from the command's argparse parser (`bptt_jax.command.cli.build_parser`) when the site is built.",
        "",
        "```text",
        parser.format_usage().strip(),
        "```",
        "",
    ]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, p in sub.choices.items():
        lines += [
            f"## `bptt-jax {name}`",
            "",
            helps.get(name, "") or "",
            "",
            "```text",
            p.format_usage().strip(),
            "```",
            "",
        ]
        lines += ["| argument | default | help |", "|---|---|---|"]
        for a in _actions(p):
            names = ", ".join(a.option_strings) or a.dest
            default = "" if a.default in (None, argparse.SUPPRESS) or a.option_strings == [] else f"`{a.default!r}`"
            lines.append(f"| `{names}` | {default} | {(a.help or '').replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.md").write_text(config_page() + "\n", encoding="utf-8")
    (out_dir / "cli.md").write_text(cli_page() + "\n", encoding="utf-8")
