#!/usr/bin/env python3
"""procpool vs the usual Python process pools: the entry of the ``bench`` package beside this
script (``scripts/bench/__init__.py`` says what is measured and how). Run ``--help``."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # This script's directory is sys.path[0]: ``bench`` is the package beside it. The guard
    # matters: a fork server that preloads the main module imports this file without running it.
    import bench
    from bench import runner

    sys.exit(runner.main((bench.__doc__ or "").split("\n\n")[0]))
