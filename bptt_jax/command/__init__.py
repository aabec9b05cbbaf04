"""The ``bptt-jax`` command: configs, data sets, the runner, the local launcher, the CLI, studies
and gradient-flow profiles."""
