"""spark-submit entry point for `streamrank ingest`: same arguments as the CLI.

    spark-submit jobs/ingest.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
