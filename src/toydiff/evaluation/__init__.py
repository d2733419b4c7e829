"""Evaluation: pure metrics, the reference a run is judged against, each metric beside its noise floor, the floor
cache, and the judging of samples and runs."""
