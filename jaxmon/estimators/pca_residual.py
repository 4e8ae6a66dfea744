"""PCA-residual / low-rank Gaussian (issue 3): being built."""

__all__: list[str] = []
