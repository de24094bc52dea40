"""The HTTP layer: the guard at the edge (guard.py), /api and /v1 (openai_compat.py)."""
