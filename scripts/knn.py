"""`accelerate launch scripts/knn.py ...`: the same job as `ssl-suite knn ...`."""

import sys

from ssl_suite.cli import main

if __name__ == "__main__":
    sys.exit(main(["knn", *sys.argv[1:]]))
