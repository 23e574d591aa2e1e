"""quotaflow's benchmarks: `python -m benchmarks` runs the suite (see BENCHMARKS.md)."""
