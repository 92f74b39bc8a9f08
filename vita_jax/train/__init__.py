"""Training: stage partitions, the jitted step, loops, checkpoints."""
