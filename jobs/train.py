"""Bundle job entry point: `python jobs/train.py --task detection [--target T] [--data-version N]`.

Same arguments as `lakevision train`; the work is in lakevision.training.train.
"""

import sys

from lakevision.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
