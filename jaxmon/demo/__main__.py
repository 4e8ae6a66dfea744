"""``python -m jaxmon.demo`` (what ``make demo`` runs)."""

import sys

from jaxmon.demo.run import main

if __name__ == "__main__":
    sys.exit(main())
