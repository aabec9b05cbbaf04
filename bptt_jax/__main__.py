"""``python -m bptt_jax ...`` runs the ``bptt-jax`` command."""

import sys

from bptt_jax.command.cli import main

sys.exit(main())
