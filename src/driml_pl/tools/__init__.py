"""Tools around runs: the report, plots, the grid launcher and the evaluation table."""
