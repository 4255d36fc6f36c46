"""The LoRA layers of a model: what a site is and how it is found.

A *site* (:class:`LoRASite`) is one adapter of one LoRA layer: its factors as matrices, its
captured chunks and the rows already folded into its dense gradient (:class:`Folded`, from
``oplora.capture.folded``).
:func:`find_lora_sites` walks a model and returns the sites it can train and the LoRA
parameters it cannot (:class:`Unsupported`, with the reason). ``oplora.capture`` fills the sites.

Layer kinds (:data:`KINDS`; a site's ``kind``), each with its X and its factors as matrices
(``B`` m x r, ``A`` r x n, :attr:`LoRASite.b`, :attr:`LoRASite.a`):

* ``"linear"`` -- ``oplora.LoRALinear`` and every PEFT ``LoraLayer`` whose adapter is the plain
  branch ``lora_B(lora_A(dropout(x))) * scaling`` with ``nn.Linear`` factors, whatever its base
  layer: ``lora.Linear``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, HQQ, GPTQ, AWQ, EETQ,
  torchao, ... (found by structure, not by class name); torchtune's ``LoRALinear`` (its NF4 base
  and QAT subclass included: ``lora_b(lora_a(dropout(x))) * alpha / rank``, bias-free factors).
  X: the rows of lora_A's input.
* ``"conv"`` -- PEFT ``Conv1d/2d/3d`` LoRA (``lora_A`` a convolution with any stride, padding
  (any mode) and dilation, groups 1; ``lora_B`` its 1 x ... x 1 counterpart). X: the unfolded
  patches of lora_A's input (im2col, T = batch x output positions, n = c_in k_1 ... k_d, columns
  in the order of the flattened kernel), sD: the branch-output gradient per position. The update
  is on the flattened kernel: ``A`` is the weight viewed as r x (c_in k...), ``B`` as m x r.
  The patches are formed in the backward pass from lora_A's input, in blocks of about
  :data:`PATCH_BLOCK` numbers: with ``capture="rows"`` (or ``"auto"`` below its threshold) they are
  held -- k_1 ... k_d times the input's size --, otherwise every block is folded into the dense
  gradient as it is formed, so a whole batch's patches never exist at once.
* ``"embedding"`` -- PEFT ``Embedding`` LoRA (``lora_embedding_A`` r x vocab, ``lora_embedding_B``
  m x r; hooks on the layer itself). X: one-hot rows of the token ids, held as the ids
  (``oplora.capture.rows``: index rows, never formed), sD: ``s`` x the layer's output gradient (x its
  ``embed_scale`` where PEFT applies one). ``G = s D^T X`` is the whole gradient of ``B A``,
  the base layer's ``padding_idx`` column included (autograd's gradient of ``A`` leaves that
  column at zero, ``F.embedding``'s rule for its weight; a masked padding token has no gradient
  row and adds nothing either way).

LoRA factors of other kinds -- LoRA variants whose update is not ``B A`` (DoRA, PEFT's or
torchtune's ``DoRALinear``, ...), grouped
convolutions, layers whose forward merges ``B A`` into the base weights (PEFT's
``MultiheadAttention``, ``ParamWrapper``) and the LoRA layers inside them, factors of other module
types -- are reported as
unsupported with the reason, for the optimizer to hand to its ``other`` optimizer with a
warning, or to refuse with ``strict=True``. Every adapter is its own site, so several adapters
never mix; an adapter frozen now (``requires_grad`` off on both factors, as PEFT's
``set_adapter`` leaves the inactive ones) is a site too, trained at the steps it receives
gradients at; an inactive adapter is simply never reached.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layers import LoRALinear
from .folded import Folded

__all__ = ["LoRASite", "Folded", "Unsupported", "find_lora_sites", "KINDS"]

#: The layer kinds a site can be (see the module docstring).
KINDS = ("linear", "conv", "embedding")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(eq=False)
class LoRASite:
    """One LoRA branch of kind ``kind`` (:data:`KINDS`): factors ``A`` and ``B`` (parameters;
    :attr:`a` r x n and :attr:`b` m x r as matrices), modules ``lora_A`` and ``lora_B`` (None for
    an Embedding, whose factors are parameters of ``layer``).

    ``chunks`` holds the captured ``(X, sD, s)`` triples since the last step: X (T_j x n dense
    rows, or T_j token ids) and sD (T_j x m) detached, in the dtype the forward pass used, rows
    without gradient dropped at the step (``live``: each chunk's mask of the rows with gradient,
    taken on the device as it arrives); ``folded`` the rows already folded into the dense gradient
    (:class:`Folded`), or None. The layer's gradient is ``coeff (folded.g + sum_j sD_j^T X_j)``:
    ``coeff`` is the product of the uniform rescales of the factors' ``.grad`` seen since the
    rows were captured (``clip_grad_norm_``, GradScaler's ``unscale_``; ``oplora.capture.lifetime``,
    whose record of the factors' gradients is ``mark``).
    ``modified`` names a problem found at a fold (a captured X changed in place), for the step to
    raise. ``passes``: backward passes (accumulating into ``.grad``) that reached the branch
    since the last step, with or without rows; ``reached``: gradients accumulated into ``A`` or
    ``B`` since then; ``second_order``: a backward pass with ``create_graph=True`` ran through the
    branch since the last step (its graph can carry second-order terms to the factors that the
    rows do not hold: checked at the step). ``pinned``: the factors as the optimizer was built
    with, when FSDP2 shards them (:attr:`grad_params`). ``closed``: the capture was removed; its hooks,
    wherever copies of them survive (compiled code), do nothing.
    """

    name: str
    layer: nn.Module
    lora_A: Optional[nn.Module]
    lora_B: Optional[nn.Module]
    adapter: Optional[str] = None
    kind: str = "linear"
    chunks: List[Tuple[Tensor, Tensor, float]] = field(default_factory=list)
    x_versions: List[int] = field(default_factory=list, repr=False)  # X's version counter at capture
    live: List[Tensor] = field(default_factory=list, repr=False)  # each chunk's rows with gradient (bool, device)
    dead_rows: int = 0  # rows without gradient left in the held chunks by the step's settle (not counted)
    dead_sx: Optional[Tensor] = field(default=None, repr=False)  # their colsum(X^2), taken off the statistics
    folded: Optional[Folded] = None
    modified: bool = False
    passes: int = 0
    reached: int = 0
    coeff: float = 1.0
    second_order: bool = False
    closed: bool = False
    mark: Optional[object] = field(default=None, repr=False)
    pinned: Optional[Tuple[Tensor, Tensor]] = field(default=None, repr=False)
    _pending: List[tuple] = field(default_factory=list, repr=False)

    @property
    def A(self) -> nn.Parameter:
        if self.kind == "embedding":
            return self.layer.lora_embedding_A[self.adapter]
        return self.lora_A.weight

    @property
    def B(self) -> nn.Parameter:
        if self.kind == "embedding":
            return self.layer.lora_embedding_B[self.adapter]
        return self.lora_B.weight

    @property
    def grad_params(self) -> Tuple[Tensor, Tensor]:
        """``(A, B)`` whose ``.grad`` the training loop acts on (``oplora.capture.lifetime``): ``pinned``
        when set -- FSDP2's sharded factors, which its forward and backward swap for unsharded
        copies in the modules -- else the factors the modules hold now."""
        return self.pinned if self.pinned is not None else (self.A, self.B)

    @property
    def shape(self) -> Tuple[int, int]:
        """``(m, n)``: the shape of the product ``B A`` the optimizer updates."""
        return self.B.shape[0], math.prod(self.A.shape[1:])

    def _matrix(self, p: Tensor, rows: int) -> Tensor:
        if p.dim() == 2:
            return p
        try:
            return p.detach().view(rows, -1)
        except RuntimeError:
            raise RuntimeError(f"LoRA layer {self.name!r}: its {tuple(p.shape)} factor cannot be viewed as a matrix "
                               f"(strides {p.stride()}: channels_last?); the update is written through that view, so "
                               "keep the LoRA factors contiguous") from None

    @property
    def a(self) -> Tensor:
        """``A`` as an r x n matrix: the parameter itself, or (Conv) a view of its kernel flattened
        to r x (c_in k_1 ... k_d), through which the update is written."""
        return self._matrix(self.A, self.A.shape[0])

    @property
    def b(self) -> Tensor:
        """``B`` as an m x r matrix: the parameter itself, or (Conv) a view of m x r x 1 ... 1."""
        return self._matrix(self.B, self.B.shape[0])

    @property
    def scaling(self) -> float:
        s = getattr(self.layer, "scaling", None)
        if s is None:  # torchtune's LoRALinear: alpha / rank
            return float(self.layer.alpha) / float(self.layer.rank)
        return float(s[self.adapter] if self.adapter is not None else s)

    @property
    def trainable(self) -> bool:
        """Whether both factors have ``requires_grad`` now (an adapter is trained only then)."""
        return self.A.requires_grad and self.B.requires_grad

    @property
    def held(self) -> bool:
        """Whether anything is captured for the next step (rows held or folded)."""
        return bool(self.chunks) or self.folded is not None

    @property
    def rows(self) -> int:
        """Rows captured since the last step, held or folded (rows without gradient left in held
        chunks by the step's settle not counted)."""
        return sum(x.shape[0] for x, _, _ in self.chunks) - self.dead_rows + (
            self.folded.rows if self.folded is not None else 0)

    def fold(self, stats: Optional[str] = None) -> None:
        """Fold every held chunk into :attr:`folded` and release it."""
        if not self.chunks:
            return
        self._ensure_folded(any(t.dtype == torch.float64 for c in self.chunks for t in c[:2]), self.chunks[0][1].device,
                            stats)
        for (x, g, _), version, live in zip(self.chunks, self.x_versions, self.live):
            self.modified = self.modified or x._version != version
            self.folded.add(x, g, live)
        self.chunks.clear()
        self.x_versions.clear()
        self.live.clear()
        self.dead_rows, self.dead_sx = 0, None  # the fold counted live rows only

    def _ensure_folded(self, float64: bool, device: torch.device, stats: Optional[str]) -> Folded:
        if self.folded is None:
            m, n = self.shape
            self.folded = Folded.empty(m, n, torch.float64 if float64 else torch.float32, device, stats)
        return self.folded

    def release(self) -> None:
        """Drop everything captured (and the record of the factors' gradients); the inputs of a
        forward pass in flight stay."""
        self.chunks.clear()
        self.x_versions.clear()
        self.live.clear()
        self.dead_rows, self.dead_sx = 0, None
        self.folded = None
        self.modified = False
        self.passes = self.reached = 0
        self.coeff = 1.0
        self.mark = None

    def clear(self) -> None:
        self.release()
        self._pending.clear()


@dataclass
class Unsupported:
    """LoRA parameters the optimizers cannot update by capture, with the reason."""

    name: str
    reason: str
    params: List[nn.Parameter]


def _peft_lora() -> Optional[SimpleNamespace]:
    """PEFT's LoRA layer base class and the layer classes whose forward never runs the
    ``lora_B(lora_A(x))`` branch, when PEFT is already imported (a PEFT model implies it is)."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # an old or partial PEFT without these names: nothing of it can be in the model
        return None
    import peft.tuners.lora.layer as layer_module

    merging = tuple(cls for cls in (getattr(layer_module, name, None) for name in ("MultiheadAttention", "ParamWrapper"))
                    if isinstance(cls, type))
    return SimpleNamespace(LoraLayer=LoraLayer, merging=merging)


def _torchtune_lora() -> Optional[SimpleNamespace]:
    """torchtune's LoRA layer classes, when torchtune's PEFT modules are already imported (a model
    built with them implies it): ``LoRALinear`` (and its subclasses: QAT) runs the plain branch
    ``lora_b(lora_a(dropout(x))) * alpha / rank``; ``DoRALinear`` does not."""
    module = sys.modules.get("torchtune.modules.peft.lora")
    if module is None:
        return None
    dora = sys.modules.get("torchtune.modules.peft.dora")
    return SimpleNamespace(LoRALinear=getattr(module, "LoRALinear", None),
                           DoRALinear=getattr(dora, "DoRALinear", None) if dora is not None else None)


def _conv_problem(lora_a: nn.Module, lora_b: nn.Module) -> Optional[str]:
    """Why a Conv LoRA pair is not the plain branch (lora_A a convolution, lora_B its 1 x ... x 1
    counterpart, groups 1), or None."""
    if type(lora_b) is not type(lora_a):
        return f"lora_A/lora_B are {type(lora_a).__name__}/{type(lora_b).__name__}"
    if lora_a.groups != 1 or lora_b.groups != 1:
        return f"a grouped convolution (groups = {max(lora_a.groups, lora_b.groups)}; only groups = 1 is captured)"
    pointwise = (all(k == 1 for k in lora_b.kernel_size) and all(s == 1 for s in lora_b.stride)
                 and (lora_b.padding == "valid" or all(p == 0 for p in lora_b.padding)))
    if not pointwise:
        return "its lora_B is not a 1 x ... x 1 convolution with stride 1 and no padding"
    return None


def _embedding_problem(module: nn.Module, adapter: str) -> Optional[str]:
    """Why a PEFT Embedding adapter cannot be captured, or None."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else getattr(module, "base_layer", None)
    if getattr(base, "sparse", False):
        return "an Embedding with sparse=True (sparse gradients)"
    if getattr(base, "scale_grad_by_freq", False):
        return "an Embedding with scale_grad_by_freq=True (its gradient is not B^T G, G A^T)"
    if (getattr(module, "input_fns", None) or {}).get(adapter) is not None:
        return "a tensor-parallel Embedding LoRA"
    return None


def find_lora_sites(model: nn.Module) -> Tuple[List[LoRASite], List[Unsupported]]:
    """Every LoRA site of ``model``, and the LoRA parameters not supported (frozen ones included).

    A site is an adapter whose factors are both trainable or both frozen now (``requires_grad``;
    :attr:`LoRASite.trainable`): the optimizers cover every adapter and train it at the steps it
    is trainable and reached at. One factor frozen and the other not is reported unsupported.
    PEFT adapters are classified by structure (module docstring): ``nn.Linear`` factors are the
    ``"linear"`` kind over any base layer, ``nn.Conv1d/2d/3d`` factors the ``"conv"`` kind,
    ``lora_embedding_A/B`` the ``"embedding"`` kind; variants are unsupported.
    """
    peft, torchtune = _peft_lora(), _torchtune_lora()
    sites: List[LoRASite] = []
    unsupported: List[Unsupported] = []

    def add(site: LoRASite, params: List[Tensor]):
        if site.A.requires_grad != site.B.requires_grad:
            unsupported.append(Unsupported(site.name, "only one of its two LoRA factors is trainable", list(params)))
            return
        sites.append(site)

    def refuse(label: str, reason: str, params: List[Tensor]):
        if params:
            unsupported.append(Unsupported(label, reason, list(params)))

    merging: List[Tuple[str, str]] = []  # (name, class) of the layers that merge B A into their weights
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            add(LoRASite(name, module, module.lora_A, module.lora_B, None, "linear"),
                [module.lora_A.weight, module.lora_B.weight])
            continue
        if torchtune is not None and torchtune.DoRALinear is not None and isinstance(module, torchtune.DoRALinear):
            refuse(name, "a torchtune DoRALinear: a LoRA variant whose update is not B A",
                   [p for p in module.parameters() if p is not getattr(module, "weight", None)
                    and p is not getattr(module, "bias", None)])
            continue
        if torchtune is not None and torchtune.LoRALinear is not None and isinstance(module, torchtune.LoRALinear):
            lora_a, lora_b = module.lora_a, module.lora_b
            if type(lora_a) is nn.Linear and type(lora_b) is nn.Linear and lora_a.bias is None and lora_b.bias is None:
                add(LoRASite(name, module, lora_a, lora_b, None, "linear"), [lora_a.weight, lora_b.weight])
            else:
                refuse(name, f"a torchtune LoRALinear whose lora_a/lora_b are {type(lora_a).__name__}/"
                             f"{type(lora_b).__name__} with biases (captured: bias-free nn.Linear)",
                       list(lora_a.parameters()) + list(lora_b.parameters()))
            continue
        if peft is None or not isinstance(module, peft.LoraLayer):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        dora = getattr(module, "use_dora", {}) or {}
        # A LoRA layer inside a merging one (PEFT's MultiheadAttention wraps its out_proj) is never
        # called as a module: its parent merges its B A into the weights it uses.
        outer = next((f"inside {owner!r} ({kind}), which merges its B A into the weights it uses instead of "
                      "calling it" for owner, kind in merging if name.startswith(owner + ".")), None)
        if isinstance(module, peft.merging):
            merging.append((name, type(module).__name__))

        def variant(adapter: str) -> Optional[str]:
            if outer is not None:
                return outer
            if dora.get(adapter, False):
                return "a LoRA variant (DoRA) whose update is not B A"
            if adapter in variants:
                return f"a LoRA variant ({type(variants[adapter]).__name__}) whose update is not B A"
            return None

        for adapter in list(module.lora_A.keys()):
            lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
            label = f"{name}[{adapter}]"
            reason, kind = variant(adapter), None
            if reason is None and isinstance(module, peft.merging):
                reason = (f"LoRA on {type(module).__name__}, whose forward merges B A into the base weights "
                          "instead of running the lora_B(lora_A(x)) branch")
            elif reason is None and type(lora_a) is nn.Linear and type(lora_b) is nn.Linear:
                kind = "linear"
            elif reason is None and type(lora_a) in _CONVS:
                reason = _conv_problem(lora_a, lora_b)
                kind = "conv" if reason is None else None
            elif reason is None:
                reason = (f"lora_A/lora_B are {type(lora_a).__name__}/{type(lora_b).__name__} (captured: nn.Linear, "
                          "nn.Conv1d/2d/3d and Embedding LoRA)")
            params = list(lora_a.parameters()) + list(lora_b.parameters())
            if kind is None:
                refuse(label, reason, params)
            else:
                add(LoRASite(label, module, lora_a, lora_b, adapter, kind), params)
        store_a = getattr(module, "lora_embedding_A", None) or {}
        store_b = getattr(module, "lora_embedding_B", None) or {}
        for adapter in list(store_a.keys()):
            label = f"{name}[{adapter}]"
            params = [store_a[adapter]] + ([store_b[adapter]] if adapter in store_b else [])
            reason = variant(adapter) or _embedding_problem(module, adapter)
            if reason is None and adapter not in store_b:
                reason = "an Embedding LoRA without its lora_embedding_B"
            if reason is None:
                add(LoRASite(label, module, None, None, adapter, "embedding"), params)
            else:
                refuse(label, reason, params)
    return sites, unsupported
