"""Gyroscope core: reliable OpenAI-compatible chat completions."""
