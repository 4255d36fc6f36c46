"""What a capture holds between backward and step, and how it stays bounded (SPEC section 3).

:class:`Holding` is the half of :class:`oplora.capture.Capture` that receives a call's rows from
the hooks and keeps them: each chunk ``(X, sD, s)`` held as it arrives (with its device mask of
the rows that carry gradient), folded into the layer's dense gradient (:class:`Folded`) or
sketched (:class:`oplora.capture.sketch.Sketch`) as the capture mode and ``capture_budget``
say, the bytes counted as they come (a captured X that q, k and v share counted once), and, at
the step, the rows without gradient dropped (:meth:`Holding.settle`: the one host
synchronisation of the capture path). ``check_budget`` and ``resolve_budget`` read the budget.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple, Union

import numpy
import torch
from torch import Tensor

from . import rows as _rows
from .patches import PATCH_BLOCK, conv_patches
from .sites import LoRASite
from .sketch import Sketch, sketch_numbers

__all__ = ["Holding", "check_budget", "free_bytes", "resolve_budget"]


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


class Holding:
    """The rows a capture holds for its ``sites`` and their folds (module docstring). State, set
    by :class:`oplora.capture.Capture`'s constructor: ``sites``, ``mode``, ``stats``, ``budget``,
    ``sketch_rank``, ``_users`` (captured X -> held chunks sharing it), ``_total`` and ``_limit``
    (bytes held and this backward pass's budget; None: recount / not resolved), ``_sketches``."""

    sites: List[LoRASite]
    _users: Dict[tuple, int]

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

    def settle(self) -> None:
        """Drop the rows without gradient (padding, masked labels, a causal LM's last position:
        exactly zero sD) from what is held, before a step reads it: one host synchronisation per
        device (the rows' masks read back together), none during backward, where the rows arrive
        unchecked. A chunk with no live row is released; a site left with nothing (no live row
        held or folded) is released too, as a backward pass whose rows carried nothing is not a
        step for the layer. A chunk with a few such rows (at most a quarter: a causal LM's last
        position) keeps them in place, uncopied: they add nothing to the gradient's products, the
        site's ``dead_rows`` leaves them out of its row count and ``dead_sx`` (with diagonal
        K-FAC statistics) out of the statistics. A chunk with more is compacted, its X once for
        every layer that holds it with the same rows kept (q, k and v of a block), so the copies
        stay shared as the X was. Folds and sketches count their live rows on the device as they
        take rows in; their counts become ints here. A chunk whose X was modified in place since
        its capture is left as it is and marks its site (the step refuses it)."""
        held = [site for site in self.sites if site.held]
        chunks = [(site, i) for site in held for i in range(len(site.chunks))]
        lives = [site.live[i] for site, i in chunks]
        counted = [site for site in held if isinstance(getattr(site.folded, "rows", 0), Tensor)]
        host = {}  # per device: the masks, then the fold counts, read back at once (a few ops whatever the layers)
        for device in {t.device for t in lives + [site.folded.rows for site in counted]}:
            masks = [t for t in lives if t.device == device]
            counts = [site.folded.rows for site in counted if site.folded.rows.device == device]
            parts = ([torch.cat(masks).to(torch.int64)] if masks else []) + ([torch.stack(counts)] if counts else [])
            ends = numpy.cumsum([t.numel() for t in masks] + [1] * len(counts))[:-1]
            host[device] = iter(numpy.split(torch.cat(parts).cpu().numpy(), ends))
        compacted: Dict[tuple, Tensor] = {}
        dead_sums: Dict[tuple, Tensor] = {}
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
            key = _x_key(x) + (tuple(x.stride()), keep.tobytes())
            dead = int((~keep).sum())
            if 4 * dead <= keep.shape[0]:
                # A few rows (a causal LM's last position): left in place -- they add nothing to G's
                # products -- rather than copying the rest; not counted, and their share of the
                # diagonal K-FAC sums (taken in the step's row pass) is taken off (``dead_sx``).
                site.dead_rows += dead
                if self.stats == "diag":
                    if key not in dead_sums:
                        index = torch.from_numpy((~keep).nonzero()[0]).to(live.device)
                        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                        dead_sums[key] = _rows.col_sq(x.index_select(0, index), site.shape[1], dtype)
                    site.dead_sx = dead_sums[key] if site.dead_sx is None else site.dead_sx + dead_sums[key]
                continue
            index = torch.from_numpy(keep.nonzero()[0]).to(live.device)
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

    def _hold(self, site: LoRASite, x: Tensor, version: int, g: Tensor, scaling: float, live: Tensor) -> None:
        site.chunks.append((x, g, scaling))
        site.x_versions.append(version)
        site.live.append(live)
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
        if self.sketch_rank is None:  # never sketched
            return (m * n + stats) * size, None
        return (m * n + stats) * size, sketch_numbers(m, n, site.a.shape[0], self.sketch_rank, self.stats) * size

    def _form(self, site: LoRASite) -> str:
        """What a layer over the budget folds into: its dense gradient while that fits (or is the
        smaller, or ``sketch_rank`` is None), else a sketch (dense K-FAC statistics need the rows'
        Grams: always dense)."""
        dense, sketch = self._form_sizes(site)
        if sketch is None or self.stats not in (None, "diag") or dense <= sketch:
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
        m, n = site.shape
        rows_bytes = g.shape[0] * (n * x.element_size() + m * g.element_size())
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
