"""`accelerate launch scripts/linear_eval.py ...`: the same job as `ssl-suite linear-eval ...`."""

import sys

from ssl_suite.cli import main

if __name__ == "__main__":
    sys.exit(main(["linear-eval", *sys.argv[1:]]))
