"""Gaussian mixture fitted by EM in finalize (issue 3): being built."""

__all__: list[str] = []
