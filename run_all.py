#!/usr/bin/env python3
"""Run the experiment notebooks headless with papermill and summarise their verdicts.

    python run_all.py --list
    python run_all.py [--profile ci|quick|full] [--only NAME ...] [--model SPEC] [-p NAME VALUE ...]
                      [--device cpu|cuda] [--out DIR | --resume DIR] [--workers N]
                      [--cell-timeout SECONDS] [--write-goldens DIR] [--kernel NAME]

The command line is :mod:`qhelpers.runner.cli`; :mod:`qhelpers.runner` lists the modules behind it
(``python run_all.py --help`` for details).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qhelpers.runner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
