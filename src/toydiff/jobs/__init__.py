"""The jobs: training a run, distilling a student, the main experiment, and studies on a local pool or Ray."""
