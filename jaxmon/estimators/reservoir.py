"""Priority reservoir and kNN (issue 3): being built."""

__all__: list[str] = []
