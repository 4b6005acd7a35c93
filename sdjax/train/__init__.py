"""Training: state, step, loop, checkpoints, logging."""
