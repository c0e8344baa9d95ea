"""Run the default nn_staining pipeline: train, record, store and draw (``python main.py --help``)."""

import sys

from nn_staining.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())
