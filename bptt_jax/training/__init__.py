"""Training on the core: the optax train step, data parallelism, checkpoints and sampling."""
