"""Sphinx configuration. Build: python -m sphinx -W --keep-going -b html docs docs/_build/html"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _generate  # noqa: E402

import bptt_jax  # noqa: E402

_generate.main(HERE / "reference")  # the CLI and config pages, from the parser and the dataclasses

project = "bptt_jax"
author = "the bptt_jax developers"
release = bptt_jax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
myst_enable_extensions = ["dollarmath", "amsmath"]
nb_execution_mode = "force"  # the tutorial runs on every build
nb_execution_timeout = 600
nb_execution_raise_on_error = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "none"  # shapes and types are in the docstrings' Args sections
autodoc_member_order = "bysource"
exclude_patterns = ["_build", "README.md"]
html_theme = "furo"
html_title = "bptt_jax"
suppress_warnings = ["mystnb.unknown_mime_type"]
