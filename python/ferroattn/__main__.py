"""``python -m ferroattn``: same as the ``ferroattn`` command."""

import sys

from ferroattn.cli import main

if __name__ == "__main__":
    sys.exit(main())
