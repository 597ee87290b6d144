"""``python -m minitron_nemo``: the list of recipes, or ``python -m minitron_nemo RECIPE ARGS`` to run one."""

import sys

from minitron_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main())
