"""toydiff's version, read by the run manifest, the report and `toydiff --version` (and by pyproject.toml's
readers through toydiff.__version__)."""

__version__ = "0.1.0"
