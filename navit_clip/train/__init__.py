"""Training: DeepSpeed engine, LR schedule, checkpoints, metrics and the loop."""
