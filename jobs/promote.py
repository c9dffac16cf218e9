"""spark-submit entry point for `streamrank promote`: same arguments as the CLI.

    spark-submit jobs/promote.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
