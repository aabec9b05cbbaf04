"""The numerical core: the cells, forward unrolling, the plan, the explicit BPTT, the custom VJP,
parameters, losses, activations, input checks and kernels. Imports nothing above it."""
