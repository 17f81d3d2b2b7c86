"""Bundle job entry point: `python jobs/ingest.py --annotations FILE --images DIR [--target T]`.

Same arguments as `lakevision ingest`; the work is in lakevision.data.ingest.
"""

import sys

from lakevision.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
