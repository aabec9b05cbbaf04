"""The one-release aliases of the modules that moved into the package's layers (CHANGELOG, 0.2.0).

``bptt_jax/<old>.py`` calls ``alias(__name__, "bptt_jax.<layer>.<new>")``: importing the old path
warns (DeprecationWarning) and gives the new module itself (the same object, not a copy), with a
package's submodules under the old path too. The package never imports these paths itself.
"""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Makes the module ``old`` (being imported) the module ``new``."""
    if old == "__main__":  # run as a script (python -m bptt_jax.cli): the shim runs the command itself
        return
    warnings.warn(f"{old} moved to {new}; the old path goes in bptt-jax 0.3", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    for name, sub in list(sys.modules.items()):
        if name.startswith(new + "."):
            sys.modules[old + name[len(new) :]] = sub
