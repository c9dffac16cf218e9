"""spark-submit entry point for `streamrank sql`: same arguments as the CLI.

    spark-submit jobs/sql.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["sql", *sys.argv[1:]]))
