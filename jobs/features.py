"""spark-submit entry point for `streamrank features`: same arguments as the CLI.

    spark-submit jobs/features.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
