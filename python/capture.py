"""Find the LoRA layers of a model and capture X and the branch gradient ``s D`` for each.

What is captured (SPEC section 3, "Capture semantics"): for every call of a LoRA branch
``z = lora_B(lora_A(x~))``, ``y = base(x) + s z``,

* ``X`` -- the input of ``lora_A``, i.e. the branch input *after* the LoRA dropout, flattened to
  T x n. It is the very tensor autograd saves for ``lora_A``'s weight gradient (held detached: no
  copy, no graph kept alive);
* ``sD`` -- the gradient at the output of ``lora_B``, ``dL/dz = s dL/dy`` (T x m), taken by a
  tensor hook on ``z`` registered in a forward hook of ``lora_B`` (not a module full-backward
  hook, which would clone the gradients). Capturing ``s D`` directly, rather than D and then
  multiplying by ``s`` again, is exact for every scaling rule (``alpha / r``, rsLoRA's
  ``alpha / sqrt(r)``, ``set_scale``); the scaling ``s`` is recorded beside it.

A pair is stored only when the gradient arrives in a backward pass that accumulates into the
factors' ``.grad`` (``loss.backward()``), so forward passes that are never back-propagated
(evaluation with grad enabled, a discarded graph) and ``torch.autograd.grad`` calls (input
gradients, gradient penalties) leave nothing behind; a call with no rows is skipped. X is held as
a view: changing its storage in place before ``step()`` is detected (version counter) and refused. Several
backward passes before a step (gradient accumulation, a module called twice in a forward)
append pairs; the optimizer uses them all, which is exactly the concatenated batch. Rows whose
branch gradient is exactly zero (padding, masked labels) are dropped as they arrive. What is held
until ``step()``/``zero_grad()`` is bounded per layer by ``min(T (m + n), m n)`` numbers
(``Capture``'s ``mode``): the rows -- one reference per pair, X kept past backward (autograd would
have freed it) and ``sD`` -- until they would cost more than the layer's dense gradient, which
they are then folded into (``LoRASite.fold``, ``Folded``).

Supported LoRA layers: ``oplora.LoRALinear`` and Hugging Face PEFT ``lora.Linear`` (every
adapter that has trainable factors is its own site, so several adapters never mix; an inactive
adapter is simply never reached). LoRA factors of other kinds (PEFT on Conv/Embedding, DoRA and
other LoRA variants) are reported as unsupported with the reason, for the optimizer to hand to
its ``other`` optimizer with a warning, or to refuse with ``strict=True``.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import LoRALinear

__all__ = ["LoRASite", "Folded", "Unsupported", "find_lora_sites", "Capture", "CAPTURE_MODES"]


@dataclass(eq=False)
class Folded:
    """Captured rows folded into the dense gradient: ``g = sum_j sD_j^T X_j`` (m x n, float32;
    float64 for float64 rows) and their number ``rows``; with the statistics the optimizer needs
    (``stats``): ``"diag"``, their column sums of squares ``sx`` (n,) and ``sg`` (m,) (diagonal
    K-FAC); ``"dense"``, the Grams ``gram_x = X^T X`` (n x n) and ``gram_g = sD^T sD`` (m x m)."""

    g: Tensor
    rows: int = 0
    sx: Optional[Tensor] = None
    sg: Optional[Tensor] = None
    gram_x: Optional[Tensor] = None
    gram_g: Optional[Tensor] = None

    @staticmethod
    def empty(m: int, n: int, dtype: torch.dtype, device: torch.device, stats: Optional[str]) -> "Folded":
        zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        if stats == "diag":
            return Folded(zeros(m, n), sx=zeros(n), sg=zeros(m))
        if stats == "dense":
            return Folded(zeros(m, n), gram_x=zeros(n, n), gram_g=zeros(m, m))
        return Folded(zeros(m, n))

    def add(self, x: Tensor, g: Tensor) -> None:
        """Fold the rows ``x`` (T x n), ``g`` (T x m) in: one GEMM (two more for dense statistics)."""
        x, g = x.to(self.g.dtype), g.to(self.g.dtype)
        self.g.addmm_(g.mT, x)
        self.rows += x.shape[0]
        if self.sx is not None:
            self.sx += x.square().sum(0)
            self.sg += g.square().sum(0)
        if self.gram_x is not None:
            self.gram_x.addmm_(x.mT, x)
            self.gram_g.addmm_(g.mT, g)

    def tensors(self) -> List[Tensor]:
        return [t for t in (self.g, self.sx, self.sg, self.gram_x, self.gram_g) if t is not None]


@dataclass(eq=False)
class LoRASite:
    """One LoRA branch: ``lora_A`` (weight A, r x n) and ``lora_B`` (weight B, m x r).

    ``chunks`` holds the captured ``(X, sD, s)`` triples since the last step: X (T_j x n) and
    sD (T_j x m) detached, in the dtype the forward pass used, rows without gradient dropped;
    ``folded`` the rows already folded into the dense gradient (:class:`Folded`), or None. The
    layer's gradient is ``folded.g + sum_j sD_j^T X_j``. ``modified`` names a problem found at a
    fold (a captured X changed in place), for the step to raise.
    """

    name: str
    layer: nn.Module
    lora_A: nn.Linear
    lora_B: nn.Linear
    adapter: Optional[str] = None
    chunks: List[Tuple[Tensor, Tensor, float]] = field(default_factory=list)
    x_versions: List[int] = field(default_factory=list, repr=False)  # X's version counter at capture
    folded: Optional[Folded] = None
    modified: bool = False
    _pending: List[Tensor] = field(default_factory=list, repr=False)

    @property
    def A(self) -> nn.Parameter:
        return self.lora_A.weight

    @property
    def B(self) -> nn.Parameter:
        return self.lora_B.weight

    @property
    def scaling(self) -> float:
        s = self.layer.scaling
        return float(s[self.adapter] if self.adapter is not None else s)

    @property
    def rows(self) -> int:
        """Rows captured since the last step, held or folded."""
        return sum(x.shape[0] for x, _, _ in self.chunks) + (self.folded.rows if self.folded is not None else 0)

    def fold(self, stats: Optional[str] = None) -> None:
        """Fold every held chunk into :attr:`folded` and release it."""
        if not self.chunks:
            return
        if self.folded is None:
            x, g, _ = self.chunks[0]
            dtype = torch.float64 if any(t.dtype == torch.float64 for c in self.chunks for t in c[:2]) else torch.float32
            self.folded = Folded.empty(g.shape[1], x.shape[1], dtype, x.device, stats)
        for (x, g, _), version in zip(self.chunks, self.x_versions):
            self.modified = self.modified or x._version != version
            self.folded.add(x, g)
        self.chunks.clear()
        self.x_versions.clear()

    def clear(self) -> None:
        self.chunks.clear()
        self.x_versions.clear()
        self._pending.clear()
        self.folded = None
        self.modified = False


@dataclass
class Unsupported:
    """LoRA parameters the optimizers cannot update by capture, with the reason."""

    name: str
    reason: str
    params: List[nn.Parameter]


def _peft_lora():
    """PEFT's LoRA layer classes when PEFT is already imported (a PEFT model implies it is)."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:  # an old or partial PEFT without these names: nothing of it can be in the model
        return None
    return LoraLayer, PeftLinear


def _trainable(params) -> List[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def find_lora_sites(model: nn.Module) -> Tuple[List[LoRASite], List[Unsupported]]:
    """The LoRA sites of ``model`` with trainable factors, and the LoRA parameters not supported.

    A site's factors are trainable when both ``A`` and ``B`` have ``requires_grad``; a frozen
    adapter (both off) is skipped; one factor frozen and the other not is reported unsupported.
    """
    peft = _peft_lora()
    sites: List[LoRASite] = []
    unsupported: List[Unsupported] = []

    def add(name, layer, lora_a, lora_b, adapter):
        a, b = lora_a.weight, lora_b.weight
        if not a.requires_grad and not b.requires_grad:
            return
        if a.requires_grad != b.requires_grad:
            unsupported.append(Unsupported(name, "only one of its two LoRA factors is trainable",
                                           _trainable(list(lora_a.parameters()) + list(lora_b.parameters()))))
            return
        sites.append(LoRASite(name, layer, lora_a, lora_b, adapter))

    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            add(name, module, module.lora_A, module.lora_B, None)
        elif peft is not None and isinstance(module, peft[0]):
            is_linear = isinstance(module, peft[1])
            variants = getattr(module, "lora_variant", {}) or {}
            dora = getattr(module, "use_dora", {}) or {}
            for adapter in list(module.lora_A.keys()):
                lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
                label = f"{name}[{adapter}]"
                reason = None
                if not is_linear:
                    reason = f"LoRA on {type(module).__name__} (only Linear layers are captured)"
                elif dora.get(adapter, False) or adapter in variants:
                    reason = "a LoRA variant (e.g. DoRA) whose update is not B A"
                elif type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
                    reason = f"lora_A/lora_B are {type(lora_a).__name__}/{type(lora_b).__name__}, not nn.Linear"
                if reason is None:
                    add(label, module, lora_a, lora_b, adapter)
                else:
                    params = _trainable(list(lora_a.parameters()) + list(lora_b.parameters()))
                    if params:
                        unsupported.append(Unsupported(label, reason, params))
            # Embedding/Conv LoRA keeps its factors elsewhere in PEFT (lora_embedding_A/B, ...).
            for attr in ("lora_embedding_A", "lora_embedding_B"):
                store = getattr(module, attr, None)
                if store:
                    for adapter, p in store.items():
                        if p.requires_grad:
                            unsupported.append(Unsupported(f"{name}[{adapter}]", "LoRA on an Embedding", [p]))
    return sites, unsupported


def _accumulates(node) -> bool:
    """Whether the running backward pass will execute ``node`` (a parameter's AccumulateGrad)."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:  # an older torch without the query: record every pass
        return True
    try:
        return bool(will_execute(node))
    except RuntimeError:  # torch.autograd.grad(): leaf gradients are returned, never accumulated
        return False


CAPTURE_MODES = ("auto", "rows", "dense")


def _x_key(x: Tensor) -> tuple:
    """Identifies the memory of a captured X (q, k and v of a block capture the same one)."""
    return x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape)


class Capture:
    """Hooks that record ``(X, sD, s)`` for each site; removed by :meth:`close`.

    ``mode`` says what is held between backward and step (SPEC section 3): ``"rows"`` keeps every
    chunk; ``"dense"`` folds each chunk into the layer's m x n float32 gradient as it arrives
    (:meth:`LoRASite.fold`: one GEMM) and releases it; ``"auto"`` (default) holds the rows until
    they would cost more bytes than the dense gradient -- a captured X that several layers share
    (q, k, v of a block) counted once, rows in the dtype held -- and then folds them, so a layer
    holds ``min(T (m + n), m n)`` numbers however many micro-batches accumulate (once a layer has
    folded, its later chunks fold as they arrive). ``stats``: what
    the fold also keeps for the optimizer's statistics (:class:`Folded`: ``"diag"`` m + n more
    numbers, ``"dense"`` n^2 + m^2; None: nothing). Rows whose branch
    gradient is exactly zero (padding, masked labels) carry nothing: they are dropped as they
    arrive, so they are neither held nor counted.

    The hooks hold the sites and this object, never the optimizer, so an optimizer that owns a
    ``Capture`` can be garbage collected; a ``weakref.finalize`` on the owner then removes the hooks.
    """

    def __init__(self, sites: List[LoRASite], owner: object = None, *, mode: str = "auto",
                 stats: Optional[str] = None):
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {', '.join(map(repr, CAPTURE_MODES))}, got {mode!r}")
        self.sites = sites
        self.mode = mode
        self.stats = stats
        self._users: Dict[tuple, int] = {}  # captured X -> how many held chunks share it
        self._handles: List = []
        for site in sites:
            self._handles.append(site.lora_A.register_forward_pre_hook(self._input_hook(site)))
            self._handles.append(site.lora_B.register_forward_hook(self._output_hook(site)))
        if owner is not None:
            self._finalizer = weakref.finalize(owner, Capture._remove, self._handles, sites, self._users)

    @staticmethod
    def _check_module(site: LoRASite, module: nn.Module, expected: nn.Module) -> None:
        if module is not expected:
            # nn.DataParallel replicas share the hook dicts of the original modules (shallow copies)
            # and run in threads: their X and sD could be paired across replicas.
            raise RuntimeError(f"LoRA layer {site.name!r} ran as a copy of the module the optimizer captures "
                               "(nn.DataParallel replicas?); oplora optimizers support one process per "
                               "device: use DistributedDataParallel")

    @staticmethod
    def _input_hook(site: LoRASite):
        def hook(module, args):
            Capture._check_module(site, module, site.lora_A)
            if torch.is_grad_enabled() and args and isinstance(args[0], Tensor):
                site._pending.append(args[0].detach())
        return hook

    def _output_hook(self, site: LoRASite):
        def hook(module, args, output):
            Capture._check_module(site, module, site.lora_B)
            if not site._pending:
                return None
            x = site._pending.pop()
            site._pending.clear()
            if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
                return None
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] == 0:
                return None  # no rows (an empty micro-batch, an expert with no tokens): nothing to add
            scaling = site.scaling
            # B's gradient accumulator: the pair is recorded only by a backward pass that accumulates
            # into the factors' .grad (loss.backward()), not by torch.autograd.grad(loss, inputs) or
            # backward(inputs=...) passes that merely flow through the layer.
            accumulator = site.B.view_as(site.B).grad_fn.next_functions[0][0]
            version = x._version

            def grad_hook(grad: Tensor) -> None:
                if _accumulates(accumulator):
                    self._add(site, x, version, grad.detach().reshape(-1, grad.shape[-1]), scaling)

            output.register_hook(grad_hook)
            return None
        return hook

    def _add(self, site: LoRASite, x: Tensor, version: int, g: Tensor, scaling: float) -> None:
        """Hold a chunk (its rows with gradient), then fold the site's rows when the mode says so."""
        live = g.ne(0).any(1)
        if not bool(live.all()):
            keep = live.nonzero().squeeze(1)
            if keep.numel() == 0:
                return
            x, g = x.index_select(0, keep), g.index_select(0, keep)
            version = x._version
        site.chunks.append((x, g, scaling))
        site.x_versions.append(version)
        key = _x_key(x)
        self._users[key] = self._users.get(key, 0) + 1
        if self.mode == "rows":
            return
        held = sum(x.nbytes / self._users.get(_x_key(x), 1) + g.nbytes for x, g, _ in site.chunks)
        dense = site.B.shape[0] * site.A.shape[1] * (8 if g.dtype == torch.float64 else 4)
        if self.mode == "dense" or site.folded is not None or held > dense:  # once folded, every chunk folds
            for x, _, _ in site.chunks:
                key = _x_key(x)
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]
            site.fold(self.stats)

    def held_bytes(self) -> int:
        """Bytes held for the next step: every captured X once (however many layers share it),
        every captured sD and every folded gradient and statistic."""
        xs = {_x_key(x): x.nbytes for site in self.sites for x, _, _ in site.chunks}
        rest = sum(g.nbytes for site in self.sites for _, g, _ in site.chunks)
        rest += sum(t.nbytes for site in self.sites if site.folded is not None for t in site.folded.tensors())
        return sum(xs.values()) + rest

    @staticmethod
    def _remove(handles: List, sites: List[LoRASite], users: Dict) -> None:
        for h in handles:
            h.remove()
        handles.clear()
        Capture._release(sites, users)

    @staticmethod
    def _release(sites: List[LoRASite], users: Dict) -> None:
        for site in sites:
            site.clear()
        users.clear()

    def clear(self) -> None:
        """Release every captured tensor (the hooks stay)."""
        Capture._release(self.sites, self._users)

    def close(self) -> None:
        """Remove every hook and release every captured tensor."""
        Capture._remove(self._handles, self.sites, self._users)
