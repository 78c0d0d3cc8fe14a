"""What a run measured: memory sampled while it runs, stage times, the report and its pictures."""
