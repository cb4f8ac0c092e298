"""A run directory and what lives in it: checkpoints, the lock, run kind, metrics, preemption, the report card."""
