"""`accelerate launch scripts/finetune.py ...`: the same job as `ssl-suite finetune ...`."""

import sys

from ssl_suite.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
