"""What the optimizers hold between backward and step, counted before training (nothing allocated).

The LoRSum optimizers step from each LoRA layer's captured rows -- its input X (T x n) and branch
gradient sD (T x m) -- or, once those would cost more, from the layer's dense float32 gradient
G (m x n) they were folded into (``capture=`` of :class:`oplora.optim.base.LoRAOptimizer`). How
much that is depends on the model's shapes, the LoRA targets, the tokens per micro-batch and the
micro-batches per step, so :func:`capture_memory` counts it from those alone, on a model or a
``transformers`` config (built on the meta device: a 70B model costs nothing):

* ``rows``: ``sum over layers T (n bx + m bg)``, the X that several layers read counted once
  (q, k and v of a block read one tensor; gate and up another): T tokens of all micro-batches,
  ``bx``, ``bg`` the bytes per number of the activations and of their gradients;
* ``dense``: ``sum m n 4`` (float32), whatever the tokens;
* ``auto`` (the default): per layer the rows while they cost less than its dense gradient, else
  the dense gradient -- the threshold :class:`oplora.capture.Capture` applies as micro-batches
  accumulate, a shared X counted once among the layers still holding it;
* ``bounded`` (``capture_budget=0``): per layer the least of its rows (its share of a shared X),
  its dense gradient and its sketch (:mod:`oplora.capture.sketch`: ``(r + k) m + (r + 2k + 1) n``
  float32 numbers, ``k = sketch_rank``), which does not grow with tokens. With a budget B what
  is held stays near ``max(B, bounded)``: rows while they fit, then the layers that cross it;

next to what AdamW holds at the same point (the factors' ``.grad``, which the LoRSum optimizers'
autograd pass leaves too) and the optimizer states (AdamW two moments, OPLoRA one low-rank
momentum, ScaledOPLoRA that plus two vectors).

Which layers share X: siblings (same parent module) whose names are in one of :data:`SHARED`
read the same input in the transformer families this package is used with; pass ``shared=``
for others. Rows whose branch gradient is zero (padding, masked labels, a causal LM's last
position) are held until the step drops them (no host synchronisation in backward): ``tokens``
counts every token of a micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import check_int
from .capture.sites import find_lora_sites
from .capture.sketch import sketch_numbers

__all__ = ["SHARED", "LayerShape", "CaptureMemory", "lora_shapes", "capture_memory", "LLAMAS", "llama_table"]

#: Sibling projections that read the same input tensor (Llama/Mistral/Qwen, GPT-NeoX, BERT).
SHARED: Tuple[Tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                       ("query", "key", "value"), ("w1", "w3"))


@dataclass(frozen=True)
class LayerShape:
    """One LoRA layer: ``name``, the product's shape ``m x n``, its rank ``r``, and ``reads``: a
    key equal for the layers that read the same input X (their parent and projection family), or
    the layer's own name."""

    name: str
    m: int
    n: int
    r: int
    reads: str


def _reads(name: str, shared: Sequence[Sequence[str]]) -> str:
    parent, _, leaf = name.rpartition(".")
    for i, family in enumerate(shared):
        if leaf in family:
            return f"{parent}#{i}"
    return name


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def lora_shapes(model: nn.Module, targets: Optional[Sequence[str]] = None, r: Optional[int] = None,
                shared: Sequence[Sequence[str]] = SHARED) -> List[LayerShape]:
    """The LoRA layers of ``model``: its LoRA adapters when it has some and ``targets`` is None
    (PEFT, ``oplora.add_lora``, torchtune), else every ``nn.Linear`` whose name ends in one of
    ``targets`` (``["q_proj", "v_proj"]``), with rank ``r``. ValueError when nothing matches."""
    if targets is None:
        sites, _ = find_lora_sites(model)
        if not sites:
            raise ValueError("the model has no LoRA layer: pass targets=[...] and r=... to count the LoRA layers "
                             "it would get")
        out = []
        for site in sites:
            base = site.name.split("[", 1)[0]  # PEFT: "....q_proj[default]"
            m, n = site.shape
            out.append(LayerShape(site.name, m, n, site.b.shape[1], _reads(base, shared)))
        return out
    if r is None:
        raise ValueError("r (the LoRA rank) is needed with targets")
    check_int(r, "r", low=1)
    wanted = {targets} if isinstance(targets, str) else set(targets)
    out = [LayerShape(name, module.out_features, module.in_features, r, _reads(name, shared))
           for name, module in model.named_modules()
           if isinstance(module, nn.Linear) and _leaf(name) in wanted and "lora_" not in name]
    if not out:
        raise ValueError(f"no nn.Linear of the model is named {sorted(wanted)}")
    return out


@dataclass
class CaptureMemory:
    """Bytes held between backward and step, per capture mode, for one optimizer step of
    ``tokens x micro_batches`` rows (:func:`capture_memory`). ``per_layer``: name -> bytes of
    ``auto`` (and whether the layer folded)."""

    layers: int
    tokens: int
    micro_batches: int
    rows: int
    dense: int
    auto: int
    folded: int  # layers that ``auto`` folds into their dense gradient
    bounded: int  # capture_budget=0: per layer the least of rows, dense gradient, sketch
    sketched: int  # layers that ``bounded`` sketches
    factor_grads: int  # the LoRA factors' .grad (AdamW holds exactly this at the same point)
    lora_params: int  # numbers in the LoRA factors
    adamw_state: int
    oplora_state: int
    scaled_state: int
    per_layer: Dict[str, Tuple[int, bool]] = field(default_factory=dict, repr=False)

    def held(self, mode: str = "auto") -> int:
        """Bytes a LoRSum optimizer holds between backward and step with ``capture=mode``: the
        capture plus the factors' ``.grad``."""
        return {"rows": self.rows, "dense": self.dense, "auto": self.auto, "bounded": self.bounded}[mode] + \
            self.factor_grads

    def summary(self) -> Dict[str, float]:
        """GiB of each quantity (for a table)."""
        gib = 2.0**30
        return {"rows": self.held("rows") / gib, "dense": self.held("dense") / gib, "auto": self.held("auto") / gib,
                "bounded": self.held("bounded") / gib,
                "adamw": self.factor_grads / gib, "adamw_state": self.adamw_state / gib,
                "oplora_state": self.oplora_state / gib}


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _meta_model(config) -> nn.Module:
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def capture_memory(model: Union[nn.Module, object], *, tokens: int, micro_batches: int = 1,
                   targets: Optional[Sequence[str]] = None, r: Optional[int] = None,
                   activation_dtype: torch.dtype = torch.bfloat16, factor_dtype: torch.dtype = torch.float32,
                   stats: bool = False, shared: Sequence[Sequence[str]] = SHARED,
                   sketch_rank: Optional[int] = 64) -> CaptureMemory:
    """Count what each capture mode holds between backward and step (module docstring).

    Args:
        model: a model (any device, the meta device included) with LoRA layers, or without them
            and with ``targets``/``r``; or a ``transformers`` config, whose causal LM is built on
            the meta device (nothing is allocated).
        tokens: rows per micro-batch with a gradient (batch x sequence, padding excluded).
        micro_batches: backward passes per optimizer step (gradient accumulation).
        targets, r, shared: see :func:`lora_shapes`.
        activation_dtype: the dtype of X and sD (bf16 for a bf16 or autocast model).
        factor_dtype: the LoRA factors' dtype (their ``.grad`` and the optimizer states).
        stats: ScaledOPLoRA's diagonal statistics kept beside a folded gradient (m + n numbers).
        sketch_rank: ``k`` of a sketched layer (``bounded``; the optimizers' ``sketch_rank``; None:
            never sketched, ``bounded`` is then per layer the least of its rows and dense gradient).

    Returns a :class:`CaptureMemory`.
    """
    check_int(tokens, "tokens", low=1)
    check_int(micro_batches, "micro_batches", low=1)
    if not isinstance(model, nn.Module):
        model = _meta_model(model)
    shapes = lora_shapes(model, targets, r, shared)
    rows_total = tokens * micro_batches
    bx = bg = _element_size(activation_dtype)
    bf = _element_size(factor_dtype)
    readers: Dict[str, int] = {}
    for s in shapes:
        readers[s.reads] = readers.get(s.reads, 0) + 1
    dense = {s.name: s.m * s.n * 4 + (4 * (s.m + s.n) if stats else 0) for s in shapes}
    # auto: a layer folds once its rows -- X shared among the layers still holding it -- cost more
    # than its dense gradient; a fold leaves the others a larger share of X, so repeat until stable.
    holding = {s.name for s in shapes}
    while True:
        holders: Dict[str, int] = {}
        for s in shapes:
            if s.name in holding:
                holders[s.reads] = holders.get(s.reads, 0) + 1
        fold = {s.name for s in shapes if s.name in holding
                and rows_total * (s.n * bx / holders[s.reads] + s.m * bg) > s.m * s.n * 4}
        if not fold:
            break
        holding -= fold
    x_held = {s.reads: rows_total * s.n * bx for s in shapes if s.name in holding}
    per_layer = {}
    for s in shapes:
        if s.name in holding:
            per_layer[s.name] = (round(rows_total * (s.n * bx / holders[s.reads] + s.m * bg)), False)
        else:
            per_layer[s.name] = (dense[s.name], True)
    auto = sum(x_held.values()) + sum(rows_total * s.m * bg for s in shapes if s.name in holding) + \
        sum(dense[s.name] for s in shapes if s.name not in holding)
    rows = sum(rows_total * s.n * bx for s in {s.reads: s for s in shapes}.values()) + \
        sum(rows_total * s.m * bg for s in shapes)
    lora = sum(s.r * (s.m + s.n) for s in shapes)
    bounded, sketched = 0.0, 0
    for s in shapes:
        own_rows = rows_total * (s.n * bx / readers[s.reads] + s.m * bg)  # a shared X split among its readers
        sketch = math.inf if sketch_rank is None else 4 * sketch_numbers(s.m, s.n, s.r, sketch_rank,
                                                                          "diag" if stats else None)
        least = min(own_rows, dense[s.name], sketch)
        sketched += least == sketch and sketch < min(own_rows, dense[s.name])
        bounded += least
    bounded = round(bounded)
    return CaptureMemory(
        layers=len(shapes), tokens=tokens, micro_batches=micro_batches, rows=rows,
        dense=sum(dense.values()), auto=auto, folded=len(shapes) - len(holding), bounded=bounded,
        sketched=sketched, factor_grads=lora * bf,
        lora_params=lora, adamw_state=2 * lora * bf, oplora_state=lora * bf,
        scaled_state=lora * bf + 4 * sum(s.m + s.n for s in shapes), per_layer=per_layer)


#: Public architectures of the README's table (transformers ``LlamaConfig`` fields).
LLAMAS = {
    "Llama-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVERY_LINEAR = ATTENTION + ("gate_proj", "up_proj", "down_proj")


def llama_table(r: int = 16, tokens: int = 2048, micro_batches: Sequence[int] = (1, 8)) -> str:
    """The README's markdown table: :data:`LLAMAS` x (q,k,v,o | every linear) x micro-batches."""
    import transformers

    lines = ["| model | LoRA r%d on | tokens per step | rows | dense | auto (default) | folded layers | "
             "capture_budget=0 (sketched layers) | AdamW (factor grads) | AdamW state | OPLoRA state |" % r,
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    for name, fields in LLAMAS.items():
        cfg = transformers.LlamaConfig(**fields)
        for label, targets in (("q,k,v,o", ATTENTION), ("every linear", EVERY_LINEAR)):
            for micro in micro_batches:
                e = capture_memory(cfg, tokens=tokens, micro_batches=micro, targets=targets, r=r)
                lines.append(f"| {name} | {label} | {tokens * micro:,} ({micro} x {tokens}) | {gib(e.held('rows'))} | "
                             f"{gib(e.held('dense'))} | {gib(e.held('auto'))} | {e.folded}/{e.layers} | "
                             f"{gib(e.held('bounded'))} ({e.sketched}/{e.layers}) | "
                             f"{gib(e.factor_grads)} | {gib(e.adamw_state)} | {gib(e.oplora_state)} |")
    return "\n".join(lines) + "\n"

