"""The diffusion math: schedules and the forward process, parameterizations, networks, losses, samplers and the
sampling plan, likelihoods, and exact oracles to test them against."""
