"""The whole-model training step; the same as ``oplora-bench --suite model`` (see oplora.bench.model)."""

import sys

from oplora.bench import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "model", *sys.argv[1:]]))
