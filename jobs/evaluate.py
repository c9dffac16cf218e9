"""spark-submit entry point for `streamrank evaluate`: same arguments as the CLI.

    spark-submit jobs/evaluate.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
