"""Calibration, thresholds and p-value combination (issue 3): being built."""

__all__: list[str] = []
