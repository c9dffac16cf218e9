"""spark-submit entry point for `streamrank generate`: same arguments as the CLI.

    spark-submit jobs/generate.py --conf conf/local.yaml ...
"""

import sys

from streamrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
