"""Training system: data-parallel step, micro-batching, memory budget, checkpoints and metrics."""
