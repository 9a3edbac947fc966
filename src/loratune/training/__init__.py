"""The training engine pieces the recipe in `loratune.train` wires together."""
