"""What the LoRSum optimizers hold between backward and step at LLM scale, counted before training.

Prints the table of docs/guide/memory.md (``oplora.memory_model.llama_table``): Llama-2-7B, Llama-3-8B and
Llama-2-70B shapes (transformers configs built on the meta device: nothing is downloaded or
allocated), LoRA r16 on q, k, v, o and on every linear layer, one and eight sequences of 2,048
tokens per step, bf16 activations: the bytes of ``capture="rows"``, ``"dense"`` and ``"auto"``
next to AdamW's factor gradients and the optimizer states (GiB)::

    python examples/memory_at_scale.py            # r16, 2048 tokens, 1 and 8 micro-batches
    python examples/memory_at_scale.py --r 64 --tokens 4096 --micro-batches 1 4
"""

import argparse

from oplora.memory_model import llama_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2048, help="tokens with a gradient per micro-batch")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args(argv)
    print(llama_table(args.r, args.tokens, args.micro_batches), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
