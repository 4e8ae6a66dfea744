"""QUE and spectral-signature batch detectors (issue 3): being built."""

__all__: list[str] = []
