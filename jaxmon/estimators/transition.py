"""Layer-to-layer transition estimator (issue 6): being built."""

__all__: list[str] = []
