"""qbert command-line interface."""
