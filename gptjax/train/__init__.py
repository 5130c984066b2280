"""Training: the one train step, its jit / pmap / mesh runners, the loop, checkpoints,
the optimizer, metrics and FLOPs, and the pre-training job that train.py runs."""
