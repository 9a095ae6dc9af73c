"""Benchmarks of expense-auth against bare echo servers, measured as ratios in one run."""
