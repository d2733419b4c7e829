"""The foundation every floor stands on: errors, files and formats, the configuration, registries, progress, and
what the machine and the runtime offer. Nothing here knows a diffusion model."""
