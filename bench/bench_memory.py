"""Optimizer memory benchmark; the same as ``oplora-bench --suite memory`` (see oplora.bench.memory)."""

import sys

from oplora.bench import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "memory", *sys.argv[1:]]))
