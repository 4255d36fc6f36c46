"""Capture X and the branch gradient ``s D`` of every LoRA layer (``oplora.sites``) during backward.

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

What X is for each layer kind (linear, conv, embedding) is stated in ``oplora.sites``.

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

What is held lives exactly as long as the factors' ``.grad`` (``oplora._lifetime``; checked before
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
(``oplora._hooks.Hook``: a copy runs as a plain module, neither feeding nor disturbing this
capture), while
``nn.DataParallel`` replicas (shallow copies that share the original's hooks and run in threads)
are refused. Activation checkpointing (reentrant or not): each call is captured once, from the
forward whose graph the backward pass runs. One capture per layer: a new optimizer built on
layers that a live one captures (a notebook cell run again) closes the earlier capture with a
warning, so that the layers are not captured twice; the earlier optimizer's ``step()`` then raises.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy
import torch
from torch import Tensor, nn

from . import _lifetime, _rows
from ._hooks import Hook as _Hook, accumulates as _accumulates, eager as _eager
from ._patches import PATCH_BLOCK, conv_patches  # noqa: F401  (re-exported)
from .sites import KINDS, Folded, LoRASite, Unsupported, find_lora_sites  # noqa: F401  (re-exported)
from .sketch import Sketch, sketch_numbers

__all__ = ["LoRASite", "Folded", "Unsupported", "find_lora_sites", "Capture", "CAPTURE_MODES", "KINDS",
           "PATCH_BLOCK", "conv_patches"]

CAPTURE_MODES = ("auto", "rows", "dense")


#: The capture that hooks each module (a weak reference, by a weak key): one capture per layer.
_LIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _hooked_module(site: LoRASite) -> nn.Module:
    return site.layer if site.kind == "embedding" else site.lora_B


def check_budget(budget: Union[None, int, float], mode: str = "auto") -> Union[None, int, float]:
    """``capture_budget``: None, bytes (an int >= 0) or a fraction of free memory (a float in
    (0, 1]); only with ``capture="auto"``. Raises ValueError naming the problem."""
    if budget is None:
        return None
    if mode != "auto":
        raise ValueError(f"capture_budget applies to capture='auto' (rows while they fit, then the fold or a "
                         f"sketch), not to capture={mode!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"capture_budget must be bytes (an int >= 0) or a fraction of free memory (a float in "
                         f"(0, 1]), got {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"capture_budget in bytes must be >= 0, got {budget}")
        return budget
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"capture_budget as a fraction of free memory must be in (0, 1], got {budget!r} "
                         "(give bytes as an int)")
    return budget


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on a
    Linux CPU (``os.sysconf`` elsewhere)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    raise ValueError(f"capture_budget as a fraction of free memory is not supported on {device.type!r}; "
                     "give it in bytes")


def resolve_budget(budget: Union[int, float], device: torch.device) -> int:
    """The budget in bytes: as given, or that fraction of ``device``'s free memory now."""
    return budget if isinstance(budget, int) else int(budget * free_bytes(device))


def _fold_dtype(site: LoRASite) -> torch.dtype:
    """The dtype ``site``'s rows fold into: float64 when any held row is, else float32."""
    wide = any(t.dtype == torch.float64 for c in site.chunks for t in c[:2]) or site.B.dtype == torch.float64
    return torch.float64 if wide else torch.float32


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
    sketch of its gradient whose size does not grow with tokens (:class:`oplora.sketch.Sketch`,
    ``sketch_rank`` Gaussian directions beside the layer's own factors; its step is approximate,
    exact on the factors' own subspaces), and its later rows go there as they arrive. What is
    held then stays below ``max(budget, the sketches)``.

    The hooks hold the sites and this object, never the optimizer, so an optimizer that owns a
    ``Capture`` can be garbage collected; a ``weakref.finalize`` on the owner then removes the hooks.
    """

    def __init__(self, sites: List[LoRASite], owner: object = None, *, mode: str = "auto",
                 stats: Optional[str] = None, budget: Union[None, int, float] = None, sketch_rank: int = 64):
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
        (``oplora._lifetime``): rows of discarded gradients released, a uniform rescale taken into
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

    def _drop(self, site: LoRASite) -> None:
        """Release what ``site`` holds (its chunks no longer count as users of their X)."""
        self._unuse(site)
        site.release()

    def _unuse(self, site: LoRASite) -> None:
        for x, _, _ in site.chunks:
            key = _x_key(x)
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]

    def _rescaled(self, site: LoRASite) -> None:
        """Before more rows join rows whose gradient was rescaled by ``coeff``: every held row folded
        into the dense gradient, which takes the coefficient."""
        if site.coeff == 1.0:
            return
        self._fold_site(site)
        if site.folded is not None:
            site.folded.scale(site.coeff)
        site.coeff = 1.0

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
        live = _rows.live_rows(g)  # on the device: read back at the step (settle), never here
        if site.kind == "conv":
            self._add_patches(site, x, g, live, scaling)
            return
        self._add(site, x, version, g, scaling, live)

    def settle(self) -> None:
        """Drop the rows without gradient (padding, masked labels, a causal LM's last position:
        exactly zero sD) from what is held, before a step reads it: one host synchronisation per
        device (the rows' masks read back together), none during backward, where the rows arrive
        unchecked. A chunk with no live row is released; a site left with nothing (no live row
        held or folded) is released too, as a backward pass whose rows carried nothing is not a
        step for the layer. A chunk's X is compacted once for every layer that holds it with the
        same rows kept (q, k and v of a block), so the copies stay shared as the X was. Folds and
        sketches count their live rows on the device as they take rows in; their counts become
        ints here. A chunk whose X was modified in place since its capture is left as it is and
        marks its site (the step refuses it)."""
        held = [site for site in self.sites if site.held]
        chunks = [(site, i) for site in held for i in range(len(site.chunks))]
        lives = [site.live[i] for site, i in chunks]
        counted = [site for site in held if isinstance(getattr(site.folded, "rows", 0), Tensor)]
        host = {}  # per device: the masks, then the fold counts, read back at once (a few ops whatever the layers)
        for device in {t.device for t in lives + [site.folded.rows for site in counted]}:
            masks = [t for t in lives if t.device == device]
            counts = [site.folded.rows for site in counted if site.folded.rows.device == device]
            parts = ([torch.cat(masks).to(torch.int64)] if masks else []) + ([torch.stack(counts)] if counts else [])
            flat = torch.cat(parts)
            host[device] = iter(numpy.split(flat.cpu().numpy(), numpy.cumsum([t.numel() for t in masks] + [1] * len(counts))[:-1]))
        compacted: Dict[tuple, Tensor] = {}
        drop: Dict[int, List[int]] = {}
        for (site, i), live in zip(chunks, lives):
            keep = next(host[live.device]).astype(bool)  # numpy: no tensor op per layer
            if keep.all():
                continue
            if not keep.any():
                drop.setdefault(id(site), []).append(i)
                continue
            x, g, scaling = site.chunks[i]
            if x._version != site.x_versions[i]:
                site.modified = True  # the step refuses it; the rows stay as they are
                continue
            index = torch.from_numpy(keep.nonzero()[0]).to(live.device)
            key = _x_key(x) + (tuple(x.stride()), keep.tobytes())
            if key not in compacted:
                compacted[key] = x.index_select(0, index)
            site.chunks[i] = (compacted[key], g.index_select(0, index), scaling)
            site.x_versions[i] = compacted[key]._version
            site.live[i] = torch.ones(index.shape[0], dtype=torch.bool, device=live.device)
        for site in counted:
            site.folded.rows = int(next(host[site.folded.rows.device])[0])
        for site in held:
            for i in reversed(drop.get(id(site), [])):
                del site.chunks[i], site.x_versions[i], site.live[i]
            if not site.chunks and (site.folded is None or site.folded.rows == 0):
                site.folded = None  # nothing carried gradient: not a step for this layer
        self._users.clear()  # the copies now share as their X did
        for site in self.sites:
            for x, _, _ in site.chunks:
                self._users[_x_key(x)] = self._users.get(_x_key(x), 0) + 1
        self._total = None

    def _held(self, site: LoRASite) -> float:
        """Bytes of ``site``'s held chunks, a captured X shared by several layers counted once."""
        return sum(x.nbytes / self._users.get(_x_key(x), 1) + g.nbytes for x, g, _ in site.chunks)

    def _hold(self, site: LoRASite, x: Tensor, version: int, g: Tensor, scaling: float,
              live: Optional[Tensor] = None) -> None:
        site.chunks.append((x, g, scaling))
        site.x_versions.append(version)
        site.live.append(_rows.live_rows(g) if live is None else live)
        key = _x_key(x)
        if self._total is not None:
            self._total += g.nbytes + (0 if key in self._users else x.nbytes)
        self._users[key] = self._users.get(key, 0) + 1

    def _fold_site(self, site: LoRASite, form: Optional[str] = None) -> None:
        """Fold ``site``'s held chunks into what it folds into (they no longer count as users):
        its dense gradient or its sketch, made now as ``form`` says (``"dense"``, ``"sketch"``;
        None: the dense gradient, or as the budget allows)."""
        if site.folded is None and form is None and self.budget is not None:
            form = self._form(site)
        before = None if self._total is None else self._site_bytes(site)
        self._unuse(site)
        if form == "sketch" and site.folded is None:
            self._sketches += 1
            site.folded = Sketch.empty(site.b, site.a, self.sketch_rank, self._sketches,
                                       _fold_dtype(site), self.stats)
        site.fold(self.stats)
        if self._total is not None:
            self._total += self._site_bytes(site) - before

    def _site_bytes(self, site: LoRASite) -> int:
        """Bytes that ``site`` alone holds: its sD, the captured X no other site holds, its fold."""
        own = sum(g.nbytes + (x.nbytes if self._users.get(_x_key(x), 0) <= 1 else 0) for x, g, _ in site.chunks)
        return own + (0 if site.folded is None else sum(t.nbytes for t in site.folded.tensors()))

    def _form_sizes(self, site: LoRASite) -> Tuple[int, int]:
        """Bytes of ``site``'s dense fold and of its sketch (their statistics included)."""
        m, n = site.shape
        size = 8 if _fold_dtype(site) == torch.float64 else 4
        stats = {"diag": m + n, "dense": m * m + n * n}.get(self.stats, 0)
        return (m * n + stats) * size, sketch_numbers(m, n, site.a.shape[0], self.sketch_rank, self.stats) * size

    def _form(self, site: LoRASite) -> str:
        """What a layer over the budget folds into: its dense gradient while that fits (or is the
        smaller), else a sketch (dense K-FAC statistics need the rows' Grams: always dense)."""
        dense, sketch = self._form_sizes(site)
        if self.stats not in (None, "diag") or dense <= sketch:
            return "dense"
        return "dense" if self._held_now() - self._held(site) + dense <= self._budget_bytes(site) else "sketch"

    def _held_now(self) -> int:
        if self._total is None:
            self._total = self.held_bytes()
        return self._total

    def _budget_bytes(self, site: LoRASite) -> int:
        """This backward pass's budget in bytes (a fraction: of free memory at its first rows)."""
        if self._limit is None:
            self._limit = resolve_budget(self.budget, site.B.device)
        return self._limit

    def _over_budget(self, site: LoRASite, more: int = 0) -> bool:
        """Whether what is held (with ``more`` bytes to come) crosses this pass's budget."""
        return self._held_now() + more > self._budget_bytes(site)

    @staticmethod
    def _dense_bytes(site: LoRASite, *tensors: Tensor) -> int:
        m, n = site.shape
        return m * n * (8 if any(t.dtype == torch.float64 for t in tensors) else 4)

    def _add(self, site: LoRASite, x: Tensor, version: int, g: Tensor, scaling: float, live: Tensor) -> None:
        """Hold a chunk (and ``live``, its rows with gradient), then fold the site's rows when the
        mode says so."""
        self._hold(site, x, version, g, scaling, live)
        if self.mode == "rows":
            return
        if self.budget is not None:  # rows while everything fits, then the layer's fold or sketch
            if site.folded is not None:
                self._fold_site(site)
            elif self._over_budget(site):
                form = self._form(site)
                if self._held(site) > self._form_sizes(site)[form == "sketch"]:  # folding it saves memory
                    self._fold_site(site, form)
            return
        if self.mode == "dense" or site.folded is not None or self._held(site) > self._dense_bytes(site, g):
            self._fold_site(site)  # once folded, every chunk folds

    def _add_patches(self, site: LoRASite, x: Tensor, g: Tensor, live: Tensor, scaling: float) -> None:
        """A Conv call's rows: the patches of ``x`` block by block (:func:`conv_patches`), each
        held, or folded as it is formed when holding them all would cross the mode's threshold."""
        count = g.shape[0]
        m, n = site.shape
        rows_bytes = count * (n * x.element_size() + m * g.element_size())
        if self.budget is not None:
            fold = site.folded is not None or self._over_budget(site, rows_bytes)
        else:
            fold = self.mode == "dense" or (self.mode == "auto" and (
                site.folded is not None or self._held(site) + rows_bytes > self._dense_bytes(site, x, g)))
        if fold:
            self._fold_site(site)
            made = site.folded is None
            site._ensure_folded(torch.float64 in (x.dtype, g.dtype), g.device, self.stats)
            if made and self._total is not None:  # a dense fold made here, for rows not held yet
                self._total += sum(t.nbytes for t in site.folded.tensors())
        for lo, hi, patches in conv_patches(site.lora_A, x, PATCH_BLOCK):
            gb = g[lo:hi]
            if fold:
                site.folded.add(patches, gb, live[lo:hi])
            else:
                self._hold(site, patches, patches._version, gb, scaling, live[lo:hi])

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
