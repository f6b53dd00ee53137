"""``python -m erde.cli ...`` (as torchrun runs it): the same program as the ``erde`` command."""

import sys

from erde.cli import main

if __name__ == "__main__":
    sys.exit(main())
