"""spark-submit entry point for `streamrank clean`: same arguments as the CLI.

    spark-submit jobs/clean.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean", *sys.argv[1:]]))
