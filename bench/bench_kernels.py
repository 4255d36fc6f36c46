"""Fused Triton step vs torch path vs AdamW; the same as ``oplora-bench --suite kernels`` (see oplora.bench.kernels)."""

import sys

from oplora.bench import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "kernels", *sys.argv[1:]]))
