"""Monitors over many taps and every_k (issue 4): being built."""

__all__: list[str] = []
