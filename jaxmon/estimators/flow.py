"""Learned density (normalising flow) trained by optax (issue 6): being built."""

__all__: list[str] = []
