"""Bundle job entry point: `python jobs/evaluate.py --model-uri URI [--task T] [--target T]`.

Same arguments as `lakevision evaluate`; the work is in lakevision.evaluation.evaluate.
"""

import sys

from lakevision.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
