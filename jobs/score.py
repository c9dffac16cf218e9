"""spark-submit entry point for `streamrank score`: same arguments as the CLI.

    spark-submit jobs/score.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
