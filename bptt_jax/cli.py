"""Moved to ``bptt_jax.command.cli`` (0.2.0); this alias goes in 0.3."""

from bptt_jax import _moved

_moved.alias(__name__, "bptt_jax.command.cli")

if __name__ == "__main__":  # python -m bptt_jax.cli, as before
    import sys

    from bptt_jax.command.cli import main

    sys.exit(main())
