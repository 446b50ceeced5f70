"""BYOL pretraining for ``accelerate launch scripts/pretrain.py --config FILE key=value ...``.

The same job as ``ssl-suite pretrain``; Accelerate supplies processes, devices and precision.
"""

import sys

from ssl_suite.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
