"""The training loop and what runs inside it: steps, checkpoints, sampling, packing, guards, evaluation."""
