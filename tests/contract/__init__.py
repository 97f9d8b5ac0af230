"""Contract tests: one suite per backend seam, run against the memory and the Redis version."""
