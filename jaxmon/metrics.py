"""Detection metrics (issue 3): being built."""

__all__: list[str] = []
