"""``python -m pixcon.build``: compile pixcon's CPU kernels against the installed torch when pip
did not (see pixcon._build)."""
import sys

from ._build import main

if __name__ == "__main__":
    sys.exit(main())
