"""Plain-JAX taps: tap, capture, attribution_taps (issue 4): being built."""

__all__: list[str] = []
