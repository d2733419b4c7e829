"""Training: the state a run carries from step to step, the loop that advances it, and CUDA graphs of its step."""
