"""Capture X and the branch gradient ``s D`` of every LoRA layer (``oplora.capture.sites``) during backward.

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

What X is for each layer kind (linear, conv, embedding) is stated in ``oplora.capture.sites``.

A pair is stored only when the gradient arrives in a backward pass that accumulates into the
factors' ``.grad`` (``loss.backward()``), so forward passes that are never back-propagated
(evaluation with grad enabled, a discarded graph) and ``torch.autograd.grad`` calls (input
gradients, gradient penalties) leave nothing behind; a call with no rows is skipped. X is held as
a view: changing its storage in place before ``step()`` is detected (version counter) and refused. Several
backward passes before a step (gradient accumulation, a module called twice in a forward)
append pairs; the optimizer uses them all, which is exactly the concatenated batch. Rows whose
branch gradient is exactly zero (padding, masked labels, a causal LM's last position) are dropped
at the step (:meth:`Capture.settle`): nothing on the capture path between the first forward and
``step()`` reads a device value back to the host (no synchronisation in backward). What is held
until ``step()``/``zero_grad()`` is bounded per layer by ``min(T (m + n), m n)`` numbers
(``Capture``'s ``mode``): the rows -- one reference per pair, X kept past backward (autograd would
have freed it) and ``sD`` -- until they would cost more than the layer's dense gradient, which
they are then folded into (``LoRASite.fold``, ``Folded``).

Every site also counts the backward passes that reached its branch (``passes``) and the
gradients accumulated into its factors (``reached``, by post-accumulate-grad hooks on ``A`` and
``B``): a layer whose factors received gradients while its branch hooks saw nothing is refused at
the step (``oplora.optim._guards.check_captured``), never skipped silently.

What is held lives exactly as long as the factors' ``.grad`` (``oplora.capture.lifetime``; checked before
new rows arrive, at the layer's forward pass and at the step: :meth:`Capture.sync`). Frozen
adapters are not captured; a ``create_graph=True`` pass through a branch sets ``second_order``.

torch.compile: the module hooks are wrapped in ``torch.compiler.disable``, so that dynamo never
traces them: a compiled forward breaks its graph at each LoRA branch and runs the hooks eagerly
on real tensors (their tensor hook then fires in the backward of the compiled graphs), which
gives exactly the eager capture (``fullgraph=True`` is refused by dynamo for that reason; an
activation-checkpointed region inside a compiled model runs eagerly: dynamo cannot trace side
effects inside a checkpoint). Dynamo does not guard on module hooks: code compiled before the
optimizer installed its hooks never calls them -- the step then raises (above) with the remedy.
Copies: ``copy.deepcopy`` and ``pickle`` of a model turn these hooks into inert ones
(``oplora.capture.hooks.Hook``: a copy runs as a plain module, neither feeding nor disturbing this
capture), while
``nn.DataParallel`` replicas (shallow copies that share the original's hooks and run in threads)
are refused. Activation checkpointing (reentrant or not): each call is captured once, from the
forward whose graph the backward pass runs. One capture per layer: a new optimizer built on
layers that a live one captures (a notebook cell run again) closes the earlier capture with a
warning, so that the layers are not captured twice; the earlier optimizer's ``step()`` then raises.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Dict, List, Optional, Set, Union

import torch
from torch import Tensor, nn

from .. import backends as _backend
from . import lifetime as _lifetime
from .holding import Holding, check_budget
from .hooks import Hook as _Hook, accumulates as _accumulates, eager as _eager
from .patches import PATCH_BLOCK, conv_patches  # noqa: F401  (re-exported)
from .sites import KINDS, Folded, LoRASite, Unsupported, find_lora_sites  # noqa: F401  (re-exported)

__all__ = ["LoRASite", "Folded", "Unsupported", "find_lora_sites", "Capture", "CAPTURE_MODES", "KINDS",
           "PATCH_BLOCK", "conv_patches"]

CAPTURE_MODES = ("auto", "rows", "dense")


#: The capture that hooks each module (a weak reference, by a weak key): one capture per layer.
_LIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _hooked_module(site: LoRASite) -> nn.Module:
    return site.layer if site.kind == "embedding" else site.lora_B


class Capture(Holding):
    """Hooks that record ``(X, sD, s)`` for each site; removed by :meth:`close`.

    ``mode`` says what is held between backward and step (SPEC section 3): ``"rows"`` keeps every
    chunk; ``"dense"`` folds each chunk into the layer's m x n float32 gradient as it arrives
    (:meth:`LoRASite.fold`: one GEMM) and releases it; ``"auto"`` (default) holds the rows until
    they would cost more bytes than the dense gradient -- a captured X that several layers share
    (q, k, v of a block) counted once, rows in the dtype held -- and then folds them, so a layer
    holds ``min(T (m + n), m n)`` numbers however many micro-batches accumulate (once a layer has
    folded, its later chunks fold as they arrive; Conv patches that would cross the threshold are
    folded block by block, never formed whole). ``stats``: what
    the fold also keeps for the optimizer's statistics (:class:`Folded`: ``"diag"`` m + n more
    numbers, ``"dense"`` n^2 + m^2; None: nothing). Rows whose branch
    gradient is exactly zero (padding, masked labels) carry nothing: they are held as they arrive
    (finding them would read the device back during backward), counted in the thresholds, and
    dropped at the step (:meth:`settle`); a fold or sketch counts only its live rows.

    ``budget`` (``capture_budget=``, with ``mode="auto"``): the rows are held, and never folded,
    while everything held fits in it (the fold's GEMM is then off the backward pass); a layer
    whose rows would cross it is folded into its dense gradient if that still fits, else into a
    sketch of its gradient whose size does not grow with tokens (:class:`oplora.capture.sketch.Sketch`,
    ``sketch_rank`` Gaussian directions beside the layer's own factors; its step is approximate,
    exact on the factors' own subspaces), and its later rows go there as they arrive. What is
    held then stays below ``max(budget, the sketches)``.

    The hooks hold the sites and this object, never the optimizer, so an optimizer that owns a
    ``Capture`` can be garbage collected; a ``weakref.finalize`` on the owner then removes the hooks.
    """

    def __init__(self, sites: List[LoRASite], owner: object = None, *, mode: str = "auto",
                 stats: Optional[str] = None, budget: Union[None, int, float] = None,
                 sketch_rank: Optional[int] = 64):
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {', '.join(map(repr, CAPTURE_MODES))}, got {mode!r}")
        self.sites = sites
        self.mode = mode
        self.stats = stats
        #: ``capture_budget``: bytes (int), a fraction of the free memory of the rows' device
        #: (float in (0, 1], read at each backward pass's first rows), or None (no budget).
        self.budget = check_budget(budget, mode)
        self.sketch_rank = sketch_rank
        self._limit: Optional[int] = None  # this backward pass's budget in bytes (None: not resolved yet)
        self._total: Optional[int] = None  # bytes held, kept current during a backward pass (None: recount)
        self._sketches = 0  # sketches made: each gets its own seed
        self._users: Dict[tuple, int] = {}  # captured X -> how many held chunks share it
        self._handles: List = []
        self._watched: Set[int] = set()  # ids of the factors with a post-accumulate-grad hook
        self._queued = False  # the end-of-backward mark is queued on the running backward pass
        self._warned = False
        self._owner_name = type(owner).__name__ if owner is not None else "Capture"
        #: why this capture was closed (None while it is open).
        self.closed_because: Optional[str] = None
        self._take_over(sites)
        for site in sites:
            site.closed = False
            where = site.layer if site.kind == "embedding" else None
            before, after = (where, where) if where is not None else (site.lora_A, site.lora_B)
            self._handles.append(before.register_forward_pre_hook(_Hook(_eager(self._input_hook(site, before))),
                                                                  with_kwargs=True))
            self._handles.append(after.register_forward_hook(_Hook(_eager(self._output_hook(site, after))),
                                                             with_kwargs=True))
        self.watch()
        if owner is not None:
            self._finalizer = weakref.finalize(owner, Capture._remove, self._handles, sites, self._users)

    def _take_over(self, sites: List[LoRASite]) -> None:
        """Close the live captures of these layers (warning once for each): one capture per layer."""
        earlier: Dict[int, "Capture"] = {}
        for site in sites:
            ref = _LIVE.get(_hooked_module(site))
            other = ref() if ref is not None else None
            if other is not None and other.closed_because is None and not all(s.closed for s in other.sites):
                earlier[id(other)] = other
            _LIVE[_hooked_module(site)] = weakref.ref(self)
        for other in earlier.values():
            warnings.warn(f"{self._owner_name}: these LoRA layers were captured by an earlier {other._owner_name} "
                          "that is still alive; it is closed now (its step() raises), so that the layers are not "
                          "captured twice. Call close() on an optimizer you replace.", RuntimeWarning, stacklevel=4)
            other.close(because=f"a newer {self._owner_name} was built on the same LoRA layers")

    @staticmethod
    def _acts(site: LoRASite, module: nn.Module, expected: nn.Module) -> bool:
        """Whether a hook that fired on ``module`` captures: True on the captured module, False on
        a copy of it (``copy.deepcopy`` copies the hooks along: they do nothing there) and once the
        capture is closed; an ``nn.DataParallel`` replica is refused (RuntimeError)."""
        if site.closed:
            return False
        if module is expected:
            return True
        if getattr(module, "_is_replica", False) or module.__dict__.get("_forward_hooks") is \
                expected.__dict__.get("_forward_hooks"):
            # nn.DataParallel replicas share the hook dicts of the original modules (shallow copies)
            # and run in threads: their X and sD could be paired across replicas.
            raise RuntimeError(f"LoRA layer {site.name!r} ran in an nn.DataParallel replica of the module the "
                               "optimizer captures; oplora optimizers support one process per device: use "
                               "DistributedDataParallel")
        return False

    def watch(self) -> None:
        """Post-accumulate-grad hooks on the trainable factors that have none yet (a factor frozen
        when the capture was built gets one once it is trainable: hooks need ``requires_grad``)."""
        for site in self.sites:
            for p in (site.A, site.B):
                if p.requires_grad and id(p) not in self._watched:
                    self._watched.add(id(p))
                    self._handles.append(p.register_post_accumulate_grad_hook(_Hook(self._reached_hook(site))))

    def _reached_hook(self, site: LoRASite):
        def hook(param: Tensor) -> None:
            if not site.closed and (param is site.A or param is site.B):
                site.reached += 1
                _lifetime.accumulated(site, param)
                self._mark_after_backward()
        return hook

    def _mark_after_backward(self) -> None:
        """Renew the marks of the sites autograd accumulated into, once the backward pass is over."""
        if self._queued:
            return
        self._queued = _lifetime.queue_after_backward(self._marked)
        if not self._queued:
            self._marked()

    def _marked(self) -> None:
        self._queued = False
        self._total = self._limit = None  # recounted at the next pass's first rows (zero_grad may release)
        _lifetime.snapshot([site for site in self.sites if site.mark is not None and site.mark.dirty])

    def sync(self, sites: Optional[List[LoRASite]] = None, force: bool = False) -> None:
        """Bring what is held for ``sites`` (default: all) in line with their factors' ``.grad``
        (``oplora.capture.lifetime``): rows of discarded gradients released, a uniform rescale taken into
        the site's ``coeff``, any other change warned about once. ``force``: compare the values
        even where no tensor or version changed."""
        held = [site for site in (self.sites if sites is None else sites) if site.held]
        for site, verdict in _lifetime.verdicts(held, force):
            if verdict == _lifetime.DISCARD:
                self._drop(site)
            elif verdict == _lifetime.CHANGED:
                self._warn_changed(site)
            elif isinstance(verdict, float):
                site.coeff *= verdict

    def _warn_changed(self, site: LoRASite) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(_lifetime.changed_message(self._owner_name, site.name), stacklevel=3)

    def release_frozen(self) -> None:
        """Drop what is held for the sites whose factors are not both trainable now."""
        for site in self.sites:
            if site.held and not site.trainable:
                self._drop(site)

    def _input_hook(self, site: LoRASite, expected: nn.Module):
        def hook(module, args, kwargs):
            if not Capture._acts(site, module, expected):
                return None
            if site.held:
                self.sync([site])  # rows of discarded gradients are released before this forward's
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            if torch.is_grad_enabled() and isinstance(x, Tensor):
                site._pending.append((x.detach(), kwargs.get("adapter_names")))
            return None
        return hook

    def _output_hook(self, site: LoRASite, expected: nn.Module):
        def hook(module, args, kwargs, output):
            if not Capture._acts(site, module, expected) or not site._pending:
                return None
            x, names = site._pending.pop()
            site._pending.clear()
            if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad
                    and site.trainable):
                return None  # no gradient, or a frozen adapter (it is not trained while frozen)
            if id(site.B) not in self._watched or id(site.A) not in self._watched:
                self.watch()
            scaling, samples = site.scaling, None
            if site.kind == "embedding":
                layer = module
                if layer.disable_adapters or layer.merged or site.adapter not in layer.active_adapters:
                    return None  # the adapter took no part in this call
                embed_scale = layer._get_embed_scale() if hasattr(layer, "_get_embed_scale") else None
                if embed_scale is not None:
                    scaling *= float(embed_scale)
                if names is not None:  # a mixed batch: this adapter's samples only
                    samples = torch.tensor([i for i, a in enumerate(names) if a == site.adapter], dtype=torch.long,
                                           device=x.device)
                    x = x.index_select(0, samples)
            elif site.kind == "linear":
                x = x.reshape(-1, x.shape[-1])
            # B's gradient accumulator: the pair is recorded only by a backward pass that accumulates
            # into the factors' .grad (loss.backward()), not by torch.autograd.grad(loss, inputs) or
            # backward(inputs=...) passes that merely flow through the layer.
            accumulator = site.B.view_as(site.B).grad_fn.next_functions[0][0]
            version = x._version

            def grad_hook(grad: Tensor) -> None:
                if site.closed:
                    return
                if torch.is_grad_enabled():  # create_graph=True: second-order terms may reach the factors later
                    site.second_order = True
                if not _accumulates(accumulator):
                    return
                site.passes += 1
                if site.held:
                    self.sync([site])
                    self._rescaled(site)
                _lifetime.pending(site)
                self._mark_after_backward()
                grad = grad.detach()
                if samples is not None:
                    grad = grad.index_select(0, samples)
                self._receive(site, x, version, grad, scaling)

            output.register_hook(grad_hook)
            return None
        return hook

    def _receive(self, site: LoRASite, x: Tensor, version: int, grad: Tensor, scaling: float) -> None:
        """The rows of one call from lora_A's input (or the ids) ``x`` and the gradient ``grad``
        at the branch output (Embedding: at the layer output), taken as they are: rows without
        gradient are dropped at the step (:meth:`settle`)."""
        m = site.shape[0]
        if site.kind == "conv":
            if x.dim() == site.A.dim() - 1:  # an unbatched call
                x, grad = x.unsqueeze(0), grad.unsqueeze(0)
            g = grad.movedim(1, -1).reshape(-1, m)
        elif site.kind == "embedding":
            x, g = x.reshape(-1), grad.reshape(-1, m) * scaling
        else:
            g = grad.reshape(-1, m)
        if g.shape[0] == 0:
            return  # no rows (an empty micro-batch, an expert with no tokens): a pass that adds nothing
        live = _backend.ops_for(g.device).live_rows(g)  # on the device: read back at the step (settle), never here
        if site.kind == "conv":
            self._add_patches(site, x, g, live, scaling)
            return
        self._add(site, x, version, g, scaling, live)

    @staticmethod
    def _remove(handles: List, sites: List[LoRASite], users: Dict) -> None:
        for h in handles:
            h.remove()
        handles.clear()
        Capture._release(sites, users)
        for site in sites:
            site.closed = True

    @staticmethod
    def _release(sites: List[LoRASite], users: Dict) -> None:
        for site in sites:
            site.clear()
        users.clear()

    def clear(self) -> None:
        """Release every captured tensor (the hooks stay)."""
        Capture._release(self.sites, self._users)
        self._queued = False
        self._total = self._limit = None

    def close(self, because: str = "close() was called") -> None:
        """Remove every hook and release every captured tensor; ``because`` is kept in
        :attr:`closed_because` for the error of a later step."""
        if self.closed_because is None:
            self.closed_because = because
        Capture._remove(self._handles, self.sites, self._users)
