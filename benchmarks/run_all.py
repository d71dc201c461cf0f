"""Every scaling and quality benchmark at one scale: the same code as ``ecdist bench``.

Run:  python benchmarks/run_all.py --scale small [--out bench-results] [--only students cluster] [--device cuda]
Out:  one JSON per benchmark and report.md with PNG plots in --out (see ``ecdist.bench``)
"""
from __future__ import annotations

import sys

from ecdist.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
