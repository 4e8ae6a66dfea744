"""Frequent Directions sketch (issue 3): being built."""

__all__: list[str] = []
