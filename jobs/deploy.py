"""Bundle job entry point: `python jobs/deploy.py [--model-name NAME] [--endpoint NAME] [--traffic P] [--target T]`.

Same arguments as `lakevision deploy`; the work is in lakevision.serving.pipeline.
"""

import sys

from lakevision.cli import main

if __name__ == "__main__":
    sys.exit(main(["deploy", *sys.argv[1:]]))
