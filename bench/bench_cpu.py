"""CPU optimizer-step benchmark (C++ vs torch ops vs SVD); the same as ``oplora-bench --suite cpu``
(see oplora.bench.cpu)."""

import sys

from oplora.bench import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "cpu", *sys.argv[1:]]))
