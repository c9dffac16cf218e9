"""spark-submit entry point for `streamrank train`: same arguments as the CLI.

    spark-submit jobs/train.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
