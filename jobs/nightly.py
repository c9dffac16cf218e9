"""spark-submit entry point for `streamrank nightly`: same arguments as the CLI.

    spark-submit jobs/nightly.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
