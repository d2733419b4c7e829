"""Named configurations shipped with toydiff (TOML files beside this one)."""
