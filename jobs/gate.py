"""Bundle job entry point: `python jobs/gate.py --model-uri URI [--model-name NAME] [--target T]`.

Same arguments as `lakevision gate`; the work is in lakevision.registry.gate.
"""

import sys

from lakevision.cli import main

if __name__ == "__main__":
    sys.exit(main(["gate", *sys.argv[1:]]))
