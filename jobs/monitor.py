"""Bundle job entry point: `python jobs/monitor.py [--endpoint NAME] [--target T]`.

Same arguments as `lakevision monitor`; the work is in lakevision.monitoring.health.
"""

import sys

from lakevision.cli import main

if __name__ == "__main__":
    sys.exit(main(["monitor", *sys.argv[1:]]))
