"""LoRSum vs SVD benchmark; the same as ``oplora-bench --suite lorsum`` (see oplora.bench.lorsum)."""

import sys

from oplora.bench import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "lorsum", *sys.argv[1:]]))
