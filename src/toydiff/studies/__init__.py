"""Built-in grid studies (TOML grid files beside this one); see toydiff.jobs.study."""
