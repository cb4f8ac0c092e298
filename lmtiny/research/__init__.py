"""Research over many runs: sweeps of config overrides, their results table and scaling-law fits."""
