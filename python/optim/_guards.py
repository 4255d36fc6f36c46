"""What an optimizer refuses, and why: the checks that keep a step from silently mis-training.

At construction: a model that is not a module, FSDP1 (``FullyShardedDataParallel``) modules, LoRA layers that cannot
be captured (warned, or refused with ``strict=True``), a model with none, or with only such
layers, a bad ``max_grad_norm``. At every step, before anything moves: a structural change of the
model since construction (layers added or removed, factors replaced, one factor of an adapter
frozen and not the other), a layer whose factors received gradients while nothing was captured
for it, factor gradients that second-order terms reached (a gradient penalty through
``create_graph=True``), a layer on mixed devices, a captured X modified in place after its
backward pass, NaN/Inf in what the step reads.
Each check names the layer or parameter; the optimizer (``oplora.optim.base``) decides the order.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..capture import rows as _rows
from .._checks import check_real, first_nonfinite
from .._dtensor import is_dtensor, local
from ..reference import compute_dtype
from ..capture.sites import LoRASite, Unsupported, find_lora_sites

__all__ = ["check_max_norm", "refuse_fsdp1", "lora_sites", "check_model", "check_captured", "check_second_order",
           "find_nonfinite"]

_FSDP1 = (
    "FSDP1 flattens a module's parameters into one FlatParameter, so the LoRA factors do not exist as "
    "tensors the optimizer can read or write. Use FSDP2 instead: torch.distributed.fsdp.fully_shard on each "
    "block and on the root (the factors become sharded DTensors, which the oplora optimizers gather at the "
    "step), or DistributedDataParallel")


def check_max_norm(value) -> Optional[float]:
    """``max_grad_norm``: None (no clipping), a real > 0, or ``math.inf`` (measure, never clip)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    return check_real(value, "max_grad_norm", low=0.0, low_open=True)


def _fsdp1(model: nn.Module) -> Optional[str]:
    """The first FSDP1 (``FullyShardedDataParallel``) module of ``model`` (its description), or None.

    Only the types of modules already imported are looked up: a model cannot hold FSDP objects
    unless their module was imported, so nothing is imported here."""
    cls = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if isinstance(cls, type):
        for name, module in model.named_modules():
            if isinstance(module, cls):
                return f"module {name or '<the model>'!r} is FullyShardedDataParallel (FSDP1)"
    return None


def refuse_fsdp1(owner: str, model: nn.Module) -> None:
    """``NotImplementedError`` naming the module and the alternative (FSDP2 ``fully_shard``, DDP)
    when ``model`` holds FSDP1 modules. FSDP2's sharded factors (DTensors) are supported
    (``oplora.optim._fsdp``); their placements are checked per layer there."""
    found = _fsdp1(model)
    if found is not None:
        raise NotImplementedError(f"{owner}: {found}; {_FSDP1}")


def lora_sites(owner: str, model: nn.Module, *, strict: bool, other_name: str
               ) -> Tuple[List[LoRASite], List[Unsupported]]:
    """Every LoRA adapter of ``model`` the optimizer trains (frozen ones included: they are trained
    once they receive gradients), and the unsupported LoRA layers (frozen ones included), whose
    parameters go to the other-parameter optimizer. Unsupported LoRA layers are refused
    (``strict=True``, ValueError) or left to that optimizer with a warning; a model with no LoRA
    layer, or with only unsupported ones, is refused (ValueError, one message); a model whose
    adapters are all frozen now is warned about."""
    sites, unsupported = find_lora_sites(model)
    listing = "; ".join(f"{u.name}: {u.reason}" for u in unsupported)
    if not sites and unsupported:
        raise ValueError(f"{owner}: every LoRA layer of the model is of a kind it cannot train from captured "
                         f"activations ({listing}). Train such adapters with a torch optimizer (e.g. "
                         "torch.optim.AdamW over the trainable parameters), or use plain LoRA adapters "
                         "(no DoRA or other variant; Linear, Conv1d/2d/3d with groups=1 or Embedding layers)")
    if unsupported:
        if strict:
            raise ValueError(f"{owner}(strict=True): unsupported LoRA layers: {listing}")
        warnings.warn(f"{owner}: these LoRA layers cannot be captured and are trained by the "
                      f"other-parameter optimizer ({other_name}) instead: {listing}", stacklevel=4)
    if not sites:
        raise ValueError(f"{owner}: the model has no LoRA layer "
                         "(oplora.LoRALinear, or PEFT LoRA on Linear, Conv or Embedding layers); "
                         "add adapters with oplora.add_lora(...) or peft.get_peft_model(...)")
    if not any(site.trainable for site in sites):
        warnings.warn(f"{owner}: no LoRA factor of the model requires grad now; each adapter is trained at the "
                      "steps its factors require grad and receive gradients (as a torch optimizer built from "
                      "model.parameters() would)", stacklevel=4)
    return sites, unsupported


def check_model(owner: str, model: Optional[nn.Module], sites: Sequence[LoRASite], lora: Sequence[Tensor],
                known: Sequence[Tensor]) -> None:
    """Refuse (RuntimeError naming them) the structural changes of ``model`` since the optimizer
    was built that would silently lose or skip training: LoRA layers added or removed, factors
    replaced by new tensors, an adapter with one factor trainable and the other frozen,
    trainable parameters the optimizer does not know (``known``: every parameter of its groups;
    ``lora``: A then B of each site). Freezing or unfreezing known parameters is no change: a
    frozen adapter, like any parameter without a gradient, is simply not trained at that step.
    ``model`` None (garbage collected): factors only."""
    params = [] if model is None else list(model.parameters())
    present = None if model is None else {id(p) for p in params}
    problems = []
    for index, site in enumerate(sites):
        a, b = lora[2 * index], lora[2 * index + 1]
        if site.A is not a or site.B is not b:
            problems.append(f"LoRA layer {site.name!r}: a factor was replaced by a new tensor")
        elif present is not None and (id(a) not in present or id(b) not in present):
            problems.append(f"LoRA layer {site.name!r} was removed from the model")
        elif a.requires_grad != b.requires_grad:
            problems.append(f"LoRA layer {site.name!r}: only one of its two factors requires grad (the optimizers "
                            "update both; an optimizer built now hands such a layer to its other-parameter "
                            "optimizer)")
    known_ids = {id(p) for p in known}
    unknown = {id(p) for p in params if p.requires_grad and id(p) not in known_ids}
    if unknown:
        added = []
        for site in find_lora_sites(model)[0]:
            if id(site.A) in unknown or id(site.B) in unknown:
                added.append(f"LoRA layer {site.name!r}")
                unknown -= {id(site.A), id(site.B)}
        names = [name for name, p in model.named_parameters() if id(p) in unknown]
        listing = ", ".join(added + [f"parameter {n!r}" for n in names])
        problems.append(f"trainable but unknown to the optimizer (added, or requires_grad turned on, "
                        f"after it was built; they would not be trained): {listing}")
    if problems:
        # fully_shard after the optimizer: every factor became a new DTensor parameter.
        sharded = any(is_dtensor(site.B) and not is_dtensor(lora[2 * i + 1]) for i, site in enumerate(sites))
        hint = (" The model was sharded (FSDP2 fully_shard) after the optimizer was built: build the optimizer "
                "after fully_shard, from the sharded model." if sharded else "")
        raise RuntimeError(f"{owner}: the model changed after the optimizer was built:{hint} {'; '.join(problems)}. "
                           "Build a new optimizer for the changed model (state_dict() keeps the state of the "
                           "layers that remain). Nothing was updated")


def check_captured(owner: str, sites: Sequence[LoRASite]) -> None:
    """Refuse (RuntimeError naming them) the layers whose factors received gradients since the last
    step (``site.reached``) while no backward pass reached their capture hooks (``site.passes``):
    stepping without them would silently skip their training."""
    missing = [site.name for site in sites if site.reached and not site.passes]
    if missing:
        raise RuntimeError(
            f"{owner}: the factors of LoRA layer(s) {', '.join(map(repr, missing))} received gradients since the "
            "last step, but nothing was captured for them: their forward did not run the capture hooks. Either "
            "torch.compile compiled the model before the optimizer was built (a forward ran first, e.g. an "
            "evaluation; compiled code never calls hooks added later): build the optimizer before the first "
            "compiled forward, or call torch._dynamo.reset() after building it; or the layer's forward "
            "bypasses lora_A/lora_B (a fused LoRA kernel, weights merged into the base layer): run the plain "
            "PEFT forward. Nothing was updated")


def _second_order_error(site: LoRASite) -> float:
    """``||(grad_B, grad_A) - coeff (G a^T, b^T G)|| / ||coeff (G a^T, b^T G)||`` with ``G`` from what
    ``site`` holds (one pass over its rows), the factors as matrices; an Embedding's
    ``padding_idx`` column of ``grad_A`` (zero by ``F.embedding``'s rule) left out."""
    b, a = site.b.detach(), site.a.detach()
    dtype = compute_dtype(b, *(t for x, g, _ in site.chunks for t in (x, g) if t.is_floating_point()))
    bf, af = b.to(dtype), a.to(dtype)
    m, n = site.shape
    want_b = torch.zeros(m, bf.shape[1], dtype=dtype, device=b.device)
    want_a = torch.zeros(af.shape[0], n, dtype=dtype, device=b.device)
    for x, g, _ in site.chunks:
        g = g.to(dtype)
        want_b += g.mT @ _rows.x_times(_rows.to(x, dtype), af.mT)
        want_a += _rows.xt_times(_rows.to(x, dtype), g @ bf, n).mT
    if site.folded is not None:
        fb, fa = site.folded.factor_products(bf, af)
        want_b += fb.to(dtype)
        want_a += fa.to(dtype)
    got_b = site.B.grad.reshape(m, -1).to(dtype)
    got_a = site.A.grad.reshape(-1, n).to(dtype)
    want_b, want_a = want_b * site.coeff, want_a * site.coeff
    pad = getattr(site.layer.get_base_layer(), "padding_idx", None) if site.kind == "embedding" else None
    if pad is not None:
        want_a[:, pad] = got_a[:, pad]
    diff = torch.cat([(got_b - want_b).reshape(-1), (got_a - want_a).reshape(-1)])
    want = torch.cat([want_b.reshape(-1), want_a.reshape(-1)])
    return float(diff.norm() / want.norm().clamp_min(torch.finfo(dtype).tiny))


def check_second_order(owner: str, sites: Sequence[LoRASite], distributed: bool) -> None:
    """Refuse (RuntimeError naming it) a layer whose factor gradients include second-order terms
    that its captured rows do not carry: after a backward pass with ``create_graph=True`` through its
    branch (``site.second_order``), its ``.grad`` must still equal ``(G A^T, B^T G)`` of the rows
    (times the layer's rescale ``coeff``), to the precision of the rows, gradients and factors
    (4 units, plus the float32 or float64 sums over the T rows). An input-gradient penalty
    (``torch.autograd.grad(loss, x, create_graph=True)`` added to the loss) puts such terms there;
    a diagnostic ``create_graph`` pass left out of the loss does not. On several ranks the factor
    gradients are averaged and the rows are not, so such a layer is refused unchecked."""
    for site in sites:
        if not (site.second_order and site.held):
            continue
        if distributed:
            error = "unchecked (data parallel)"
        else:
            eps = max(torch.finfo(t.dtype).eps for t in (site.A.grad, site.B.grad, site.B, *(
                t for x, g, _ in site.chunks for t in (x, g) if t.is_floating_point())))
            acc = torch.finfo(compute_dtype(site.B, *(g for _, g, _ in site.chunks))).eps
            tol = 4.0 * eps + 16.0 * acc * math.sqrt(max(site.rows, 1))
            value = _second_order_error(site)
            if value <= tol:
                continue
            error = f"off by {value:.2e} relative"
        raise RuntimeError(
            f"{owner}: the factor gradients of LoRA layer {site.name!r} are not those of its captured activations "
            f"({error}) after a backward pass with create_graph=True ran through it: a gradient penalty "
            "(torch.autograd.grad(..., create_graph=True) added to the loss) puts second-order terms into "
            "them that X and sD do not carry. Keep the LoRA layers out of the penalty's graph, or use "
            "RiemannianLoRA, which steps from .grad. Nothing was updated")


def _check_devices(owner: str, site: LoRASite, state: Dict) -> None:
    device = site.B.device
    found = {f"A on {site.A.device}"} if site.A.device != device else set()
    for x, g, _ in site.chunks:
        if x.device != device:
            found.add(f"captured X on {x.device}")
        if g.device != device:
            found.add(f"captured sD on {g.device}")
    if site.folded is not None and site.folded.device != device:
        found.add(f"folded gradient on {site.folded.device}")
    for key, value in state.items():
        if isinstance(value, Tensor) and value.device != device:
            found.add(f"state {key!r} on {value.device}")
    if found:
        raise RuntimeError(f"{owner}: LoRA layer {site.name!r} mixes devices: B on {device}, "
                           f"{', '.join(sorted(found))} (model moved between backward() and step(), or "
                           "after the state was created? move it before the first step, or reload the "
                           "state with load_state_dict); nothing was updated")


def find_nonfinite(owner: str, sites: Sequence[LoRASite], captured: bool, state: Dict,
                   others: Sequence[Tuple[str, Tensor]], rows: bool = True) -> Optional[str]:
    """What holds NaN/Inf among the captured X and sD of ``sites`` (their factor gradients when
    not ``captured``) and the other parameters' gradients ``others`` (name, grad); None when
    all is finite. Raises RuntimeError, naming the layer, for a captured X modified in place
    since its backward pass and for a layer on mixed devices (``state``: the optimizer's).

    ``rows=False`` leaves the captured rows and folded gradients out (a full read of them): a
    NaN or Inf there shows in the step engine's products of that layer, which are checked
    instead (``oplora.optim.engine.NonFiniteProducts``); this scan then names it."""
    named: List[Tuple[str, Tensor]] = []
    for site in sites:
        if not captured:
            if not site.trainable:
                continue  # a frozen adapter is not stepped, whatever its .grad holds
            named += [(f"the gradient of {what} of LoRA layer {site.name!r}", p.grad)
                      for what, p in (("A", site.A), ("B", site.B)) if p.grad is not None]
            continue
        if site.chunks or site.folded is not None:
            _check_devices(owner, site, state.get(site.B, {}))
        if site.modified or any(x._version != v for (x, _, _), v in zip(site.chunks, site.x_versions)):
            raise RuntimeError(f"{owner}: the input X captured for LoRA layer {site.name!r} was modified in place "
                               "after its backward pass (a reused input buffer?); the step would use the wrong X. "
                               "Nothing was updated")
        if not rows:
            continue
        for x, g, _ in site.chunks:
            if x.is_floating_point():  # token ids (Embedding) are always finite
                named.append((f"the captured X of LoRA layer {site.name!r}", x))
            named.append((f"the captured sD of LoRA layer {site.name!r}", g))
        if site.folded is not None:
            named += [(f"the captured X or captured sD of LoRA layer {site.name!r} (folded into its dense "
                       "gradient or its sketch)", t) for t in site.folded.tensors()]
    named += [(f"the gradient of parameter {name!r}", grad) for name, grad in others]
    if not named:
        return None
    # DTensor gradients (FSDP2): this rank's shard; the ranks agree on the verdict (``_distributed.agree``).
    bad = first_nonfinite([local(t) for _, t in named])
    return None if bad is None else named[bad][0]
