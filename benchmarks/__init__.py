"""Benchmarks of diffcse, run from a checkout's root as `python -m benchmarks.bench_train` (etc.).

Not part of the installed distribution. Shared helpers live in benchmarks.common; results go to
results/ and record no absolute path of the machine they ran on.
"""
