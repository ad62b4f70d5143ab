"""Training: DeepSpeed engine, LR schedule, checkpoints and resume, one step with its guard, metrics and the loop."""
