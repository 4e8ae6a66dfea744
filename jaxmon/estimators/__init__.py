"""The detector family. Each module registers its factories with ``jaxmon._base.register``."""
