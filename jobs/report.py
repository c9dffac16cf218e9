"""spark-submit entry point for `streamrank report`: same arguments as the CLI.

    spark-submit jobs/report.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
