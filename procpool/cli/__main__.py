"""``python -m procpool.cli``: the same as the ``procpool`` console script."""

import sys

from procpool.cli import main

sys.exit(main())
