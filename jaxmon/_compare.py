"""Comparisons of fitted states for audits (issue 6): being built."""

__all__: list[str] = []
