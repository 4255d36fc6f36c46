"""What is captured lives exactly as long as the LoRA factors' ``.grad`` (SPEC section 3).

An oplora optimizer steps from the captured X and sD, never from the factors' ``.grad``; yet
training loops act on ``.grad``: ``model.zero_grad()`` or ``p.grad = None`` to discard a
backward pass (a loss spike, a retry, a diagnostic pass), ``clip_grad_norm_`` (the Hugging Face
Trainer's ``max_grad_norm``, accelerate's), GradScaler's ``unscale_``. So every site keeps a
*mark* (:class:`GradMark`) of its factors' gradients as the last backward pass left them -- which
tensors (a token attribute on each: no reference to them is kept), their version counters and a
fingerprint of their values (per factor: the sum, the sum of absolute values, the sum of squares
and the largest magnitude, 8 numbers a layer: no copy) -- and, before new rows arrive, at the
layer's forward pass and at the step, what happened to them since is read back (:func:`verdicts`):

* a factor's ``.grad`` is None, or both are zero (``zero_grad(set_to_none=False)``): the
  gradients were discarded, and so is every row captured before (:data:`DISCARD`);
* both were multiplied by one coefficient ``c`` (each factor's four numbers are ``c``, ``|c|``,
  ``c^2``, ``|c|`` times the marked ones, to 4 units of the gradients' precision -- what rounding
  each product to that precision allows): the rows' gradient is ``c G`` (a float verdict: ``c``;
  layers whose estimates agree to that precision get one value, as ``clip_grad_norm_`` used one);
* any other change (``clip_grad_value_``, noise, a decay term added to ``.grad``: each moves the
  four numbers apart): the rows are kept as they were and the change is not used (:data:`CHANGED`,
  for a warning). A change that keeps all four (a permutation of the entries) passes unseen;
* nothing changed (:data:`KEEP`).

Under FSDP2 the factors' ``.grad`` are sharded DTensors (FSDP's reduce-scatter writes them):
each rank marks and reads its own shard of the sharded parameters' gradients (``LoRASite.grad_params``:
during FSDP's forward and backward the modules hold unsharded copies instead) (a uniform rescale -- ``clip_grad_norm_`` over DTensors --
scales every shard by the one coefficient); a rank whose shard of both is empty reads nothing.

The fingerprint is taken once per backward pass, after it (and after DistributedDataParallel's
reduction, which writes the averaged gradients into ``.grad``): a callback queued on the
autograd engine re-queues itself, so that it runs after every callback queued during the pass
(:func:`queue_after_backward`). Until it ran, a site is ``dirty``: its mark holds the tensors
and versions autograd's accumulation left, so that passes of the same backward (a module called
twice, a checkpointed region's inner backward) see no change. The values are compared only when
a tensor or version differs, or when asked (``force``: GradScaler's ``unscale_`` writes without
bumping versions; in-place writes through ``.data`` bypass them too and are seen only then).
Cost: one read of the reached factors' gradients per backward pass (equal-shaped layers stacked, a
few launches in all, no host synchronisation), and one more at a sync that found a change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import group_by
from .._dtensor import local

__all__ = ["GradMark", "KEEP", "DISCARD", "CHANGED", "pending", "accumulated", "snapshot", "verdicts",
           "queue_after_backward", "changed_message"]

KEEP, DISCARD, CHANGED = "keep", "discard", "changed"
Verdict = Union[str, float]


_TAG = "_oplora_mark"  # the attribute a marked gradient tensor carries (no reference to it is kept)


@dataclass(eq=False)
class GradMark:
    """A site's factor gradients ``(A.grad, B.grad)`` as last seen: a token set on each tensor (a
    new tensor does not carry it; holding no reference leaves them free to be released or swapped
    by ``torch.utils.swap_tensors``), their version counters and (once the backward pass is over)
    the fingerprint of their values (:func:`_fingerprints`, 2 x 4 float64, on their device)."""

    tokens: List[Optional[object]] = field(default_factory=lambda: [None, None])
    versions: List[int] = field(default_factory=lambda: [-1, -1])
    prints: Optional[Tensor] = None
    where: Optional[tuple] = None  # (shape, dtype, device) of each gradient when fingerprinted
    dirty: bool = False

    def same(self, grads: Sequence[Optional[Tensor]]) -> bool:
        """Whether ``grads`` are the marked tensors at the marked versions (None for None)."""
        return all((g is None and token is None) or (g is not None and token is not None
                                                     and getattr(g, _TAG, None) is token and v == g._version)
                   for token, v, g in zip(self.tokens, self.versions, grads))

    def record(self, k: int, grad: Optional[Tensor]) -> None:
        if grad is None:
            self.tokens[k], self.versions[k] = None, -1
            return
        token = object()
        setattr(grad, _TAG, token)
        self.tokens[k], self.versions[k] = token, grad._version


def _grad(p: Tensor) -> Optional[Tensor]:
    """``p.grad``; for FSDP2's sharded factors this rank's shard of it (DTensor: ``oplora._dtensor``),
    whose version counter the in-place writes through the DTensor bump."""
    return local(p.grad)


def _grads(site) -> Optional[Tuple[Tensor, Tensor]]:
    a, b = (_grad(p) for p in site.grad_params)
    return None if a is None or b is None else (a, b)


def pending(site) -> None:
    """A backward pass brings rows to ``site``: until its end (``dirty``) the factor gradients as
    they are now, and then as autograd's accumulation leaves them (:func:`accumulated`), are the
    reference -- the first pass finds no ``.grad`` yet, a module called twice is reached twice."""
    mark = site.mark if site.mark is not None else GradMark()
    site.mark = mark
    if not mark.dirty:
        for k, p in enumerate(site.grad_params):
            mark.record(k, _grad(p))
        mark.dirty = True


def accumulated(site, param: Tensor) -> None:
    """Autograd accumulated into ``param`` (a factor of ``site``): its gradient is recorded as it
    is now, and the site's copy is due (``dirty``) at the end of the backward pass."""
    pending(site)
    a, b = site.grad_params
    if param is a or param is b:  # not FSDP2's unsharded copy, whose .grad it reduces into the shards
        site.mark.record(0 if param is a else 1, _grad(param))


def _layout(grads: Sequence[Tensor]) -> tuple:
    return tuple((g.shape, g.dtype, g.device) for g in grads)


def _fingerprints(grads: Sequence[Tuple[Tensor, Tensor]]) -> List[Tensor]:
    """Per ``(A.grad, B.grad)``: a 2 x 4 float64 tensor, per factor its sum, sum of absolute
    values, sum of squares and largest magnitude (float32 or better, summed in float64; equal
    layouts stacked: a few launches and no host synchronisation in all)."""
    out: List[Optional[Tensor]] = [None] * len(grads)
    for index in group_by(range(len(grads)), lambda i: _layout(grads[i])).values():
        sides = []
        for k in (0, 1):
            v = torch.stack([grads[i][k].detach() for i in index]).reshape(len(index), -1)
            v = v.to(torch.promote_types(v.dtype, torch.float32))
            a = v.abs()
            # An empty shard (FSDP2, more ranks than rows) has no largest magnitude: 0.
            top = a.amax(1).double() if v.shape[1] else v.new_zeros(len(index), dtype=torch.float64)
            sides.append(torch.stack([v.sum(1, dtype=torch.float64), a.sum(1, dtype=torch.float64),
                                      v.square().sum(1, dtype=torch.float64), top], 1))
        stacked = torch.stack(sides, 1)
        for j, i in enumerate(index):
            out[i] = stacked[j]
    return out  # type: ignore[return-value]


def snapshot(sites: Sequence) -> None:
    """Mark the current factor gradients of ``sites`` (those holding rows; the others' marks are
    dropped): tensors, versions and fingerprints."""
    marked = []
    for site in sites:
        grads = _grads(site)
        if grads is None and site.held:
            # Rows arrived but .grad is None after the pass: FSDP2 without gradient sync
            # (set_requires_gradient_sync(False)) keeps the gradients in its unsharded parameters
            # until the synced pass. Marked as None: only a gradient that appears and then goes is read.
            site.mark = GradMark(dirty=False)
            continue
        if grads is None or not site.held:
            site.mark = None
            continue
        mark = site.mark if site.mark is not None else GradMark()
        site.mark = mark
        for k, g in enumerate(grads):
            mark.record(k, g)
        mark.dirty = False
        mark.where = _layout(grads)
        marked.append((mark, grads))
    for (mark, _), prints in zip(marked, _fingerprints([grads for _, grads in marked])):
        mark.prints = prints


def verdicts(sites: Sequence, force: bool = False) -> List[Tuple[object, Verdict]]:
    """What happened to the factor gradients of every site that holds rows since its mark (module
    docstring); each site's mark is renewed. Values are read only for the sites whose gradient
    tensors or versions changed (every site with ``force``): one host synchronisation for all."""
    out: List[Tuple[object, Verdict]] = []
    compare: List[Tuple[object, Tuple[Tensor, Tensor]]] = []
    renew = []
    for site in sites:
        if not site.held:
            continue
        mark = site.mark
        if mark is not None and mark.dirty:
            # A backward pass is bringing rows: what autograd leaves is the reference. A dirty mark
            # that no longer matches belongs to a pass interrupted before its end.
            if not mark.same(tuple(_grad(p) for p in site.grad_params)):
                out.append((site, DISCARD) if _grads(site) is None else (site, KEEP))
                renew.append(site)
            continue
        grads = _grads(site)
        if grads is None:
            if not (mark is not None and mark.prints is None and mark.same(tuple(_grad(p) for p in site.grad_params))):
                out.append((site, DISCARD))
            continue
        if mark is None or mark.prints is None:
            renew.append(site)  # never marked: the gradients as they are now are the reference
            continue
        if mark.same(grads) and not force:
            continue
        if grads[0].numel() + grads[1].numel() == 0:
            continue  # this rank holds no entry of them (FSDP2 shards): nothing to read, the rows stay
        if mark.where != _layout(grads):
            renew.append(site)  # moved or cast (module.to): the step's device checks speak for it
            continue
        compare.append((site, grads))
    for (site, _), verdict in zip(compare, _compare(compare)):
        out.append((site, verdict))
        if verdict != DISCARD:
            renew.append(site)
    snapshot(renew)
    return out


def _compare(items: Sequence[Tuple[object, Tuple[Tensor, Tensor]]]) -> List[Verdict]:
    """The verdict for each ``(site, (A.grad, B.grad))``: their fingerprint against the site's
    mark (one host synchronisation per device)."""
    if not items:
        return []
    now = _fingerprints([grads for _, grads in items])
    values: List[Optional[list]] = [None] * len(items)
    for index in group_by(range(len(items)), lambda i: now[i].device).values():
        pairs = torch.stack([torch.stack([items[i][0].mark.prints, now[i]]) for i in index]).tolist()
        for i, pair in zip(index, pairs):
            values[i] = pair
    tols = [4.0 * max(torch.finfo(g.dtype).eps for g in grads) for _, grads in items]
    return _unify([_verdict(old, new, tol) for (old, new), tol in zip(values, tols)], tols)


def _verdict(old: list, new: list, tol: float) -> Verdict:
    """From the fingerprints ``[sum, sum |.|, sum squares, max |.|]`` of A and B before (``old``) and
    now (``new``): the common coefficient ``c`` (its size from the sums of squares, its sign from
    the sums) and whether every number of both factors is ``c``'s multiple to ``tol``."""
    squares_old, squares_new = old[0][2] + old[1][2], new[0][2] + new[1][2]
    if squares_new == 0.0:
        return DISCARD  # zeroed in place
    if not all(math.isfinite(v) for side in old + new for v in side):
        return KEEP  # NaN/Inf gradients: the step's own checks name them
    if squares_old == 0.0:
        return CHANGED
    c = math.sqrt(squares_new / squares_old)
    sum_old, sum_new, abs_old = old[0][0] + old[1][0], new[0][0] + new[1][0], old[0][1] + old[1][1]
    if abs(sum_old) > tol * abs_old and sum_new * sum_old < 0:
        c = -c
    for o, n in zip(old, new):
        close = (abs(n[0] - c * o[0]) <= tol * (n[1] + abs(c) * o[1])
                 and abs(n[1] - abs(c) * o[1]) <= tol * (n[1] + abs(c) * o[1])
                 and abs(n[2] - c * c * o[2]) <= tol * (n[2] + c * c * o[2])
                 and abs(n[3] - abs(c) * o[3]) <= tol * (n[3] + abs(c) * o[3]))
        if not close:
            return CHANGED
    return KEEP if abs(c - 1.0) <= tol else c


def _unify(verdicts: List[Verdict], tols: List[float]) -> List[Verdict]:
    """Coefficients that agree to their precision made one (``clip_grad_norm_`` multiplies every
    gradient by one number; each layer's estimate of it differs in the last bits, and layers with
    equal coefficients share the step engine's groups): sorted, each run of values within the
    tolerance of its first one takes the run's mean."""
    index = sorted((i for i, v in enumerate(verdicts) if isinstance(v, float)), key=lambda i: verdicts[i])
    run: List[int] = []
    for i in index + [None]:
        if i is not None and run:
            first = verdicts[run[0]]
            if abs(verdicts[i] - first) <= max(tols[i], tols[run[0]]) * abs(first):
                run.append(i)
                continue
        if run:
            mean = sum(verdicts[k] for k in run) / len(run)
            for k in run:
                verdicts[k] = mean
        run = [] if i is None else [i]
    return verdicts


def queue_after_backward(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the running backward pass ends, after every callback queued during
    it (DistributedDataParallel's reduction among them): a callback that queues ``callback``.
    Returns False, queuing nothing, outside a backward pass."""
    engine = torch.autograd.Variable._execution_engine
    try:
        engine.queue_callback(lambda: engine.queue_callback(callback))
    except RuntimeError:  # "Final callbacks can only be installed during backward pass"
        return False
    return True


def changed_message(owner: str, layer: str) -> str:
    """The warning for a :data:`CHANGED` verdict (given once per optimizer)."""
    return (f"{owner}: the gradients of LoRA layer {layer!r} (its factors' .grad) were changed after backward "
            "other than by one uniform rescale; the optimizer steps from the captured activations and their "
            "gradients, not from .grad, so the change is not used (uniform rescales such as clip_grad_norm_ "
            "are). To clip, pass max_grad_norm to the optimizer (warned once)")
