"""Benchmarks behind ``fdpd bench``: each measures fdpd and a baseline side by side in one run."""
