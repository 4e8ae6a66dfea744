"""Token-to-sequence score aggregation (issue 3): being built."""

__all__: list[str] = []
