"""A run: its directory on disk (every file it holds, named once) and the trained model loaded back from it."""
