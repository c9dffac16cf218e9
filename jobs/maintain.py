"""spark-submit entry point for `streamrank maintain`: same arguments as the CLI.

    spark-submit jobs/maintain.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["maintain", *sys.argv[1:]]))
