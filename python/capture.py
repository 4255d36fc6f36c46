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
append pairs; the optimizer uses them all, which is exactly the concatenated batch. The memory
held until ``step()``/``zero_grad()`` is one reference per pair: X stays alive past backward
(autograd would have freed it) and ``sD`` (autograd would have freed it after lora_B's backward)
-- at most one extra copy of what autograd holds.

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
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import LoRALinear

__all__ = ["LoRASite", "Unsupported", "find_lora_sites", "Capture"]


@dataclass(eq=False)
class LoRASite:
    """One LoRA branch: ``lora_A`` (weight A, r x n) and ``lora_B`` (weight B, m x r).

    ``chunks`` holds the captured ``(X, sD, s)`` triples since the last step: X (T_j x n) and
    sD (T_j x m) detached, in the dtype the forward pass used.
    """

    name: str
    layer: nn.Module
    lora_A: nn.Linear
    lora_B: nn.Linear
    adapter: Optional[str] = None
    chunks: List[Tuple[Tensor, Tensor, float]] = field(default_factory=list)
    x_versions: List[int] = field(default_factory=list, repr=False)  # X's version counter at capture
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

    def clear(self) -> None:
        self.chunks.clear()
        self.x_versions.clear()
        self._pending.clear()


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


class Capture:
    """Hooks that record ``(X, sD, s)`` for each site; removed by :meth:`close`.

    The hooks hold the sites, never the optimizer, so an optimizer that owns a ``Capture`` can be
    garbage collected; a ``weakref.finalize`` on the owner then removes the hooks.
    """

    def __init__(self, sites: List[LoRASite], owner: object = None):
        self.sites = sites
        self._handles: List = []
        for site in sites:
            self._handles.append(site.lora_A.register_forward_pre_hook(self._input_hook(site)))
            self._handles.append(site.lora_B.register_forward_hook(self._output_hook(site)))
        if owner is not None:
            self._finalizer = weakref.finalize(owner, Capture._remove, self._handles, sites)

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

    @staticmethod
    def _output_hook(site: LoRASite):
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
            version = x._version
            # B's gradient accumulator: the pair is recorded only by a backward pass that accumulates
            # into the factors' .grad (loss.backward()), not by torch.autograd.grad(loss, inputs) or
            # backward(inputs=...) passes that merely flow through the layer.
            accumulator = site.B.view_as(site.B).grad_fn.next_functions[0][0]

            def grad_hook(grad: Tensor) -> None:
                if not _accumulates(accumulator):
                    return
                site.chunks.append((x, grad.detach().reshape(-1, grad.shape[-1]), scaling))
                site.x_versions.append(version)

            output.register_hook(grad_hook)
            return None
        return hook

    @staticmethod
    def _remove(handles: List, sites: List[LoRASite]) -> None:
        for h in handles:
            h.remove()
        handles.clear()
        for site in sites:
            site.clear()

    def clear(self) -> None:
        """Release every captured tensor (the hooks stay)."""
        for site in self.sites:
            site.clear()

    def close(self) -> None:
        """Remove every hook and release every captured tensor."""
        Capture._remove(self._handles, self.sites)
