"""Resilience parts that act before and around a request: pacing (core.resilience.pacing).
The retry policy and the breaker still live in core/retry.py and core/breaker.py."""
