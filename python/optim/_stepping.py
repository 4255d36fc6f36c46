"""The LoRA half of a step, for :class:`~oplora.optim.base.LoRAOptimizer`: every reached layer's
plan (the subclass's ``_plan``) solved together in the step engine and committed all or none;
FSDP2's sharded layers gathered whole for it and their start state sharded after it."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch

from ..capture.sites import Folded, LoRASite
from ..reference import compute_dtype

from . import _fsdp, _masters, engine
from . import functional as F

__all__ = ["StepMixin"]


class StepMixin:
    """``_step_lora`` and what it needs (the attributes read here are the base class's:
    ``_sites``, ``_layouts``, ``state``, ``lora_group``, ``_plan``, ``_initial_state``,
    ``_find_nonfinite``, ``_nonfinite``, ``_capture``); the start state of a layer and its
    per-layer seed."""

    def _step_lora(self, ctx: F.StepContext) -> bool:
        """Plan every reached layer's update (``self._plan``), solve them together, then write them
        all: a step that fails in any layer's solve leaves every factor and every state untouched.
        Returns False when the step is skipped (NaN/Inf with ``skip_nonfinite``): nothing moves.

        On several ranks a layer reached on any rank is stepped on all (with no rows of its own
        where it was not reached), so that every rank takes part in the same reductions."""
        group, pending = self.lora_group, []
        held = [index for index, site in enumerate(self._sites) if site.held or ctx.rows.get(index, 0) > 0]
        views = self._views(held)
        masters = _masters.factors(self._sites, views, held) if group.get("master_factors") else {}
        try:
            for index in held:
                site = self._sites[index]
                b, a, state = views[index]
                chunks = [(x, g) for x, g, _ in site.chunks]
                if not chunks and site.folded is None:  # reached on another rank only
                    m, n = site.shape
                    chunks = [(a.new_zeros(0, n), b.new_zeros(0, m))]
                # The rows' gradient was rescaled since (clip_grad_norm_, unscale_: oplora.capture.lifetime).
                site_ctx = ctx if site.coeff == 1.0 else dataclasses.replace(
                    ctx, grad_coeff=ctx.grad_coeff * site.coeff)
                factors = masters.get(index, (b, a))
                pending.append((index, self._plan(index, site, factors, chunks, site.folded, state, group, site_ctx)))
            updates = F.run_plans([plan for _, plan in pending], ctx.reduce)
        except (FloatingPointError, torch.linalg.LinAlgError) as err:
            # A NaN or Inf in the rows showed in a layer's products (or broke a solve): name it.
            bad = self._find_nonfinite(rows=True)
            if bad is None and isinstance(err, engine.NonFiniteProducts):
                name = self._sites[pending[err.index][0]].name
                bad = f"the gradient products of LoRA layer {name!r} (another rank's rows?)"
            if bad is None:
                raise
            return self._nonfinite(f"{bad} holds NaN or Inf")
        targets, sharded = [], []
        for (index, _), update in zip(pending, updates):
            site = self._sites[index]
            if index in masters:  # the float32 result is the new master; the factors get its rounding
                update.state["master_B"], update.state["master_A"] = update.b, update.a
            state = self.state[site.B]
            if self._layouts[index] is None:
                targets.append((update, site.b, site.a, state))
            else:  # this rank's rows of the whole update into its shards
                sharded.append((update, site, state, self._layouts[index]))
        F.commit(targets)
        _fsdp.commit(sharded)
        self._start_sharded_state()
        return True

    def _views(self, indices: List[int]) -> Dict[int, Tuple[torch.Tensor, torch.Tensor, Dict]]:
        """Per layer of ``indices``: its factors as matrices and its state, as the step reads them.
        Sharded layers (FSDP2): whole tensors, gathered together (``_fsdp.gather``: one all-gather
        per process group and dtype); the others: the factors themselves and the state dict."""
        views: Dict[int, Tuple[torch.Tensor, torch.Tensor, Dict]] = {}
        wanted, layouts, where = [], [], []
        for index in indices:
            site, lay = self._sites[index], self._layouts[index]
            state = self.state.get(site.B, {})
            if lay is None:
                views[index] = (site.b, site.a, state)
                continue
            names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
            wanted += [site.B, site.A] + [state[k] for k in names]
            layouts += [lay] * (2 + len(names))
            where.append((index, names))
        whole = iter(_fsdp.gather(wanted, layouts))
        for index, names in where:
            site = self._sites[index]
            b, a = next(whole), next(whole)
            state = dict(self.state.get(site.B, {}))
            state.update((k, next(whole)) for k in names)
            views[index] = (b.view(b.shape[0], -1), a.view(a.shape[0], -1), state)
        return views

    def _start_sharded_state(self) -> None:
        """FSDP2: every sharded layer without a state gets its start state (``_initial_state``, the
        values its first step would start from), as this rank's shards, so that the template that
        ``torch.distributed.checkpoint.state_dict`` builds from a fresh optimizer (one step with
        zero gradients and lr 0) holds every entry a checkpoint may hold. The ``A`` factor gets an
        empty entry: a layer's state is keyed by ``B``, and ``set_state_dict`` (strict) wants an
        entry for every trainable parameter."""
        group = self.lora_group
        for index, (site, lay) in enumerate(zip(self._sites, self._layouts)):
            if lay is not None and not self.state.get(site.B):
                start = self._initial_state(index, site, group)
                self.state[site.B] = {k: _fsdp.shard_state(v, lay) for k, v in start.items()}
            if lay is not None:
                self.state.setdefault(site.A, {})

    def _initial_state(self, index: int, site: LoRASite, group: dict) -> Dict[str, object]:
        """A layer's state before its first step, with the entries of :meth:`_state_spec` (whole
        tensors, or DTensors already sharded like the factors): ``step`` 0 and, with master
        factors, the factors in float32; subclasses add theirs (momentum start, statistics)."""
        start: Dict[str, object] = {"step": 0}
        if group.get("master_factors") and _masters.wanted(site):
            start.update(master_B=site.B.detach().to(torch.float32, copy=True),
                         master_A=site.A.detach().to(torch.float32, copy=True))
        return start

    def _fold_all(self, site: LoRASite) -> Folded:
        """Every row of ``site`` folded into its dense gradient, for the updates that need G itself
        (an empty one for a layer without rows on this rank)."""
        site.fold(self._capture.stats)
        if site.folded is None:
            site.folded = Folded.empty(*site.shape, compute_dtype(site.B), site.B.device, self._capture.stats)
        return site.folded

    @staticmethod
    def _site_seed(group: dict, index: int) -> int:
        return (int(group["seed"]) * 1_000_003 + index) % (2**63 - 1)
