"""``OPLoRA`` and ``ScaledOPLoRA``: the LoRSum optimizers of SPEC section 3."""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .._checks import check_all, check_bool, check_choice, check_int, check_real
from . import functional as F
from ._inner import OtherSpec
from .statistics import statistics_start
from ..reference import compute_dtype
from .base import LoRAOptimizer
from ..capture.sites import LoRASite

__all__ = ["OPLoRA", "ScaledOPLoRA"]


def _seed(seed: Optional[int]) -> int:
    """``seed``, or one drawn from torch's global generator (reproducible under ``torch.manual_seed``)."""
    return int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed


def _betas(value) -> Tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"betas must be a pair (b1, b2), got {value!r}")
    return (check_real(value[0], "betas[0]", low=0.0, high=1.0, high_open=True),
            check_real(value[1], "betas[1]", low=0.0, high=1.0, high_open=True))


#: The hyper-parameters both LoRSum optimizers share, and their checks.
_LORSUM_CHECKS = {
    **LoRAOptimizer.HYPER_CHECKS,
    "lr": lambda v: check_real(v, "lr", low=0.0),
    "iters": lambda v: check_int(v, "iters", low=0),
    "prox": lambda v: check_real(v, "prox", low=0.0),
    "relative_prox": lambda v: check_bool(v, "relative_prox"),
    "momentum_rank": lambda v: None if v is None else check_int(v, "momentum_rank", low=1),
    "start": lambda v: check_choice(v, "start", ("A", "B", "auto")),
    "seed": lambda v: check_int(v, "seed"),
}


def _momentum_spec(spec: dict, site: LoRASite, group: dict, momentum: float) -> dict:
    """``spec`` with the low-rank momentum's entries, when the step keeps one (``momentum != 0``)."""
    if momentum != 0.0:
        (m, n), k = site.shape, group["momentum_rank"] or site.b.shape[1]
        spec.update(momentum_U=(m, k), momentum_V=(k, n))
    return spec


def _momentum_start(start: dict, site: LoRASite, group: dict, momentum: float, seed: int) -> dict:
    """``start`` (a layer's state before its first step) with the momentum's start
    (:func:`oplora.optim.functional.init_momentum`) in the dtype of what is stepped (the float32
    masters, else the factors), when the step keeps one (``momentum != 0``)."""
    if momentum != 0.0:
        (m, n), k = site.shape, group["momentum_rank"] or site.b.shape[1]
        dtype = torch.float32 if "master_B" in start else site.B.dtype
        b, a = (torch.empty(shape, dtype=dtype, device=site.B.device) for shape in ((m, 0), (0, n)))
        start["momentum_U"], start["momentum_V"] = F.init_momentum(b, a, k, seed)
    return start


class OPLoRA(LoRAOptimizer):
    """OPLoRA: the full-training step projected back to rank r by LoRSum, at Adam's memory.

    Per LoRA layer (factors B m x r, A r x n, captured X T x n and sD T x m, ``G = sD^T X`` never
    formed), with low-rank momentum ``(Um, Vm)`` of rank ``k = momentum_rank or r`` and
    ``lam = lr * prox``:

    1. ``(B, A) <- lorsum([(B, A), (sD^T, X), (Um, Vm)], [1, -lr (1 - dampening), -lr momentum],
       init=(B, A), iters=iters, prox=lam, start=start)``
    2. ``(Um, Vm) <- lorsum([(Um, Vm), (sD^T, X)], [momentum, 1 - dampening], init=(Um, Vm),
       iters=iters, prox=lam, start=start)``, started at ``Um = 0`` and ``Vm`` random (N(0, 1/n),
       from ``seed``), so its first update is a power-iteration sketch of G. With
       ``momentum = 0`` no momentum state exists.

    Every other trainable parameter is trained by ``other`` (AdamW by default) with
    ``other_kwargs``; it is param group 1. Its ``lr`` defaults to the other optimizer's own default
    (AdamW's 1e-3), not to ``lr``, which is on SGD's scale. Layers not reached by a backward pass
    since the last step (adapters inactive or frozen at that step included) are left untouched
    (momentum too).

    Args:
        model: the model holding the LoRA layers (``oplora.LoRALinear``, PEFT LoRA on Linear,
            Conv or Embedding layers: :mod:`oplora.capture`).
        lr: learning rate (>= 0), on the scale of SGD on the full weight (step ``-lr G``).
        momentum: in [0, 1). dampening: in [0, 1].
        iters: LoRSum rounds (>= 0; 0 is the Jacobi / Riemannian step).
        prox: proximal weight (>= 0): relative to lr (``lam = lr * prox``), or with
            ``relative_prox`` relative to the fixed factor of each half-step (``lam = prox`` times
            the mean squared singular value of that factor, weighted by the metric), which neither
            freezes a factor that is still small (A while B grows from PEFT's ``B = 0``) nor
            vanishes beside a large one.
        momentum_rank: rank of the momentum (default r of each layer).
        start: ``"A"`` or ``"B"``: which half-step LoRSum takes first; ``"auto"``: the B side at
            a layer's first step when its B is exactly zero (PEFT's init: from ``B = 0`` the A
            half-step has nothing to solve), the A side otherwise.
        other, other_kwargs, strict: see :class:`oplora.optim.base.LoRAOptimizer`.
        seed: seed of the random momentum start (default: drawn from torch's global generator;
            broadcast from rank 0 under torch.distributed).
        max_grad_norm, skip_nonfinite, process_group, capture, master_factors: clipping of the
            implicit gradient, NaN/Inf handling, data-parallel group, what is held between
            backward and step (rows or the dense gradient), float32 master factors for bf16/fp16
            factors: see :class:`oplora.optim.base.LoRAOptimizer`.
        capture_budget, sketch_rank: a cap on what is held between backward and step, beyond
            which a layer's gradient is sketched (``oplora.capture.sketch``; with
            ``sketch_rank=None`` folded into its dense gradient, exactly): see
            :class:`oplora.optim.base.LoRAOptimizer`.

    State per layer (keyed by its B factor): ``step``, ``momentum_U`` (m x k), ``momentum_V``
    (k x n) in the factors' dtype: params + state = 2x the LoRA parameters (Adam: 3x); with
    ``master_factors`` for bf16/fp16 factors, ``master_B``, ``master_A`` and the momentum in float32.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, momentum: float = 0.9, dampening: float = 0.0,
                 iters: int = 1, prox: float = 1e-2, relative_prox: bool = False,
                 momentum_rank: Optional[int] = None, start: str = "A", other: OtherSpec = "adamw",
                 other_kwargs: Optional[dict] = None, strict: bool = False,
                 seed: Optional[int] = None, max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False,
                 process_group=None, capture: str = "auto", master_factors: bool = False,
                 capture_budget: Union[None, int, float] = None, sketch_rank: Optional[int] = 64):
        defaults = check_all(self.HYPER_CHECKS, dict(
            lr=lr, momentum=momentum, dampening=dampening, iters=iters, prox=prox, relative_prox=relative_prox,
            momentum_rank=momentum_rank, start=start, seed=_seed(seed)))
        super().__init__(model, defaults, other=other, other_kwargs=other_kwargs, strict=strict,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, process_group=process_group,
                         capture=capture, master_factors=master_factors, capture_budget=capture_budget,
                         sketch_rank=sketch_rank)

    HYPER_CHECKS = {
        **_LORSUM_CHECKS,
        "momentum": lambda v: check_real(v, "momentum", low=0.0, high=1.0, high_open=True),
        "dampening": lambda v: check_real(v, "dampening", low=0.0, high=1.0),
    }

    def _state_spec(self, site: LoRASite, group: dict) -> Dict[str, Optional[Tuple[int, ...]]]:
        return _momentum_spec(super()._state_spec(site, group), site, group, float(group["momentum"]))

    def _initial_state(self, index: int, site: LoRASite, group: dict) -> dict:
        return _momentum_start(super()._initial_state(index, site, group), site, group, float(group["momentum"]),
                               self._site_seed(group, index))

    def _plan(self, index, site, factors, chunks, folded, state, group, ctx: F.StepContext) -> F.Plan:
        b, a = factors
        return F.plan_oplora(
            b, a, chunks, state, folded=folded,
            lr=float(group["lr"]), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
            iters=int(group["iters"]), prox=float(group["prox"]), start=group["start"],
            momentum_rank=group["momentum_rank"] or b.shape[1], seed=self._site_seed(group, index),
            grad_coeff=ctx.grad_coeff, relative_prox=bool(group["relative_prox"]),
        )


class ScaledOPLoRA(LoRAOptimizer):
    """Scaled OPLoRA: OPLoRA preconditioned by a diagonal fractional K-FAC metric.

    Per LoRA layer, EMAs of the statistics of G's own factors (SPEC section 3):
    ``d_in <- b2 d_in + (1 - b2) mean_t x_t^2`` (n) and ``d_out <- b2 d_out + (1 - b2) c sum_t g_t^2``
    (m), ``g_t = s D_t``, ``c = T`` for ``loss_reduction="mean"`` (``1/T`` for ``"sum"``); metric
    ``M = (d_hat + delta)^p`` (``p = metric_power``). Step: LoRSum with metric ``(M_out, M_in)`` on
    terms ``[(B, A), (sD^T, X), (Um, Vm)]``, coefficients ``[1, -lr (1 - b1) / c1, -lr b1 / c1]``,
    precondition ``[False, True, True]``; then the momentum update as OPLoRA with
    ``[b1, 1 - b1]`` and no metric. With ``bias_correction`` the EMAs start at zero,
    ``d_hat = d / (1 - b2^t)`` and ``c1 = 1 - b1^t`` (Adam's corrections: the metric is this step's
    statistics at t = 1 and the first step is full size); without it the EMAs start at
    ``init_metric_scale``, ``d_hat = d``, ``c1 = 1``. ``delta`` is ``damping``, or with
    ``relative_damping`` ``damping`` times the mean of ``d_hat`` (per layer and side), so that it
    neither swamps statistics far below one nor vanishes beside large ones.
    With ``metric_power = 0`` and no bias correction this is exactly OPLoRA with
    ``momentum = dampening = b1``.

    ``preset`` fills the arguments left unset (:attr:`PRESETS`): ``"default"`` the package's
    settings (bias-corrected statistics and momentum, damping ``1e-3`` relative to the statistics,
    ``metric_power=0.5``: the square root of the K-FAC diagonal, an Adam-like normalisation whose lr
    is on Adam's scale; the metric floored at each step's own statistics and the momentum of
    preconditioned gradients), chosen by the fine-tuning studies; ``"paper"`` the papers' (EMAs
    from ``init_metric_scale * ones`` without correction, absolute damping 0.1,
    ``metric_power=1``, momentum of raw gradients). An argument given explicitly wins over the
    preset.

    Args:
        lr: learning rate (>= 0); the metric normalises the gradient, so lr is on Adam's scale,
            and the other optimizer's lr defaults to it.
        betas: ``(b1, b2)``, each in [0, 1): momentum and statistics EMA.
        damping: > 0, added to the statistics before the power (times their mean with
            ``relative_damping``).
        metric_power: p in [0, 1] (1: K-FAC, 1/2: its square root, 0: OPLoRA).
        bias_correction, relative_damping: bools, above.
        current_floor: the metric reads ``max(d_hat, this step's statistics)`` elementwise: a
            batch far off the average (an outlier token's activations) is normalised by its own
            statistics rather than amplified by the average's (diagonal K-FAC only: a preset's
            floor is off for the other metrics, an explicit ``True`` is refused there).
        precondition_momentum: the momentum averages the preconditioned gradients
            ``M_out^-1 G M_in^-1`` (its LoRSum weighted by the step's metric) and enters the step
            as it is -- Adafactor's momentum of updates -- instead of averaging raw gradients that
            each later step's metric preconditions: a gradient is normalised by the metric of its
            own step, so an outlier is not carried at full size for ``1 / (1 - b1)`` steps.
        iters, prox, relative_prox, momentum_rank, start, other, other_kwargs, strict, seed,
            max_grad_norm, skip_nonfinite, process_group, capture, master_factors, capture_budget,
            sketch_rank: as in :class:`OPLoRA`.
        metric: ``"diag"`` (vectors, the default) or ``"dense"`` (n x n and m x m EMAs, for small
            layers: memory m^2 + n^2 per layer and an eigen-decomposition per step).
        statistics: ``"kfac"`` (X and g, above) or ``"shampoo"`` (``G G^T`` and ``G^T G``, whose
            own exponent is ``metric_power = 0.25``; their diagonals are computed from X and sD
            in row blocks, the dense form forms G).
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over the T rows.
        init_metric_scale: > 0, the EMAs' start without bias correction (default 1; refused with
            ``bias_correction=True``, whose EMAs start at zero).
        preset: ``"default"`` or ``"paper"``, above.

    State per layer: ``step``, ``momentum_U``, ``momentum_V`` (factor dtype) and ``d_in``,
    ``d_out`` (float32; float64 for float64 factors; uncorrected, as Adam keeps its moments).

    On several data-parallel ranks the K-FAC statistics (diagonal or dense) are summed over the
    ranks with the global row count; ``statistics="shampoo"`` is refused there (it needs G).
    """

    #: The settings each ``preset`` gives the arguments left unset (``None``). ``"paper"``: the
    #: papers' ScaledOPLoRA (SPEC section 3: EMAs from ``init_metric_scale``, no bias correction,
    #: absolute damping, K-FAC power 1, proximal weight ``lr * prox``). ``"default"``: the package's,
    #: chosen by the fine-tuning studies (README, "When to use it").
    PRESETS: Dict[str, Dict[str, object]] = {
        "default": dict(betas=(0.9, 0.999), damping=1e-3, metric_power=0.5, bias_correction=True,
                        relative_damping=True, relative_prox=False, start="A", current_floor=True,
                        precondition_momentum=True),
        "paper": dict(betas=(0.9, 0.999), damping=0.1, metric_power=1.0, bias_correction=False,
                      relative_damping=False, relative_prox=False, start="A", current_floor=False,
                      precondition_momentum=False),
    }

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, betas: Optional[Tuple[float, float]] = None,
                 damping: Optional[float] = None, metric_power: Optional[float] = None, iters: int = 1,
                 prox: float = 1e-2, relative_prox: Optional[bool] = None, metric: str = "diag",
                 statistics: str = "kfac", loss_reduction: str = "mean", bias_correction: Optional[bool] = None,
                 relative_damping: Optional[bool] = None, init_metric_scale: Optional[float] = None,
                 momentum_rank: Optional[int] = None, start: Optional[str] = None,
                 current_floor: Optional[bool] = None, precondition_momentum: Optional[bool] = None,
                 preset: str = "default",
                 other: OtherSpec = "adamw", other_kwargs: Optional[dict] = None, strict: bool = False,
                 seed: Optional[int] = None, max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False,
                 process_group=None, capture: str = "auto", master_factors: bool = False,
                 capture_budget: Union[None, int, float] = None, sketch_rank: Optional[int] = 64):
        given = dict(betas=betas, damping=damping, metric_power=metric_power, bias_correction=bias_correction,
                     relative_damping=relative_damping, relative_prox=relative_prox, start=start,
                     current_floor=current_floor, precondition_momentum=precondition_momentum)
        chosen = {key: value for key, value in given.items() if value is not None}
        settings = {**self.PRESETS[check_choice(preset, "preset", tuple(self.PRESETS))], **chosen}
        if (metric, statistics) != ("diag", "kfac") and current_floor is None:
            settings["current_floor"] = False  # the preset's floor applies to the diagonal K-FAC metric only
        if settings["current_floor"] is True and (metric, statistics) != ("diag", "kfac"):
            raise ValueError("current_floor applies to the diagonal K-FAC statistics (metric='diag', "
                             f"statistics='kfac'), not to metric={metric!r}, statistics={statistics!r}")
        if settings["bias_correction"] is True and init_metric_scale is not None:
            raise ValueError("init_metric_scale is the start of uncorrected statistics (bias_correction=False); "
                             "with bias_correction=True they start at zero")
        defaults = check_all(self.HYPER_CHECKS, dict(
            lr=lr, iters=iters, prox=prox, metric=metric, statistics=statistics, loss_reduction=loss_reduction,
            init_metric_scale=1.0 if init_metric_scale is None else init_metric_scale, momentum_rank=momentum_rank,
            seed=_seed(seed), **settings))
        super().__init__(model, defaults, other=other, other_kwargs=other_kwargs, strict=strict,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite, process_group=process_group,
                         capture=capture, master_factors=master_factors, capture_budget=capture_budget,
                         sketch_rank=sketch_rank)

    HYPER_CHECKS = {
        **_LORSUM_CHECKS,
        "betas": _betas,
        "metric_power": lambda v: check_real(v, "metric_power", low=0.0, high=1.0),
        "damping": lambda v: check_real(v, "damping", low=0.0, low_open=True),
        "metric": lambda v: check_choice(v, "metric", ("diag", "dense")),
        "statistics": lambda v: check_choice(v, "statistics", ("kfac", "shampoo")),
        "loss_reduction": lambda v: check_choice(v, "loss_reduction", ("mean", "sum")),
        "bias_correction": lambda v: check_bool(v, "bias_correction"),
        "relative_damping": lambda v: check_bool(v, "relative_damping"),
        "current_floor": lambda v: check_bool(v, "current_floor"),
        "precondition_momentum": lambda v: check_bool(v, "precondition_momentum"),
        "init_metric_scale": lambda v: check_real(v, "init_metric_scale", low=0.0, low_open=True),
    }

    def _other_shares_lr(self, defaults: dict) -> bool:
        return True  # lr on Adam's scale

    def _state_spec(self, site: LoRASite, group: dict) -> Dict[str, Optional[Tuple[int, ...]]]:
        spec = _momentum_spec(super()._state_spec(site, group), site, group, float(group["betas"][0]))
        m, n = site.shape
        dense = group["metric"] == "dense"
        spec.update(d_in=(n, n) if dense else (n,), d_out=(m, m) if dense else (m,))
        return spec

    def _initial_state(self, index: int, site: LoRASite, group: dict) -> dict:
        start = _momentum_start(super()._initial_state(index, site, group), site, group, float(group["betas"][0]),
                                self._site_seed(group, index))
        (m, n), dtype = site.shape, compute_dtype(site.B)
        scale = 0.0 if group["bias_correction"] else float(group["init_metric_scale"])
        start["d_in"], start["d_out"] = statistics_start(group["metric"], scale, n, m, site.B.device, dtype)
        return start

    def _budget_unsupported(self, defaults):
        if defaults["statistics"] == "shampoo":
            return "statistics='shampoo', computed from the m x n gradient itself"
        return None

    def _distributed_unsupported(self, defaults):
        if defaults["statistics"] == "shampoo":
            return ("statistics='shampoo' needs the m x n gradient G of the whole batch, which never "
                    "crosses the network; use statistics='kfac'")
        return super()._distributed_unsupported(defaults)

    def _fold_stats(self, defaults: dict) -> Optional[str]:
        if defaults["statistics"] == "kfac":
            return defaults["metric"]  # "diag": column sums of squares; "dense": Grams
        return None  # Shampoo: from G itself

    def _plan(self, index, site, factors, chunks, folded, state, group, ctx: F.StepContext) -> F.Plan:
        rows = ctx.rows.get(index, site.rows)  # T: the rows with gradient (of every rank), held or folded
        if not (group["metric"] == "diag" and group["statistics"] == "kfac"):
            chunks, folded = [], self._fold_all(site)  # these statistics are computed from G itself
        b, a = factors
        return F.plan_scaled_oplora(
            b, a, chunks, state, folded=folded,
            lr=float(group["lr"]), betas=tuple(float(b) for b in group["betas"]), damping=float(group["damping"]),
            metric_power=float(group["metric_power"]), iters=int(group["iters"]), prox=float(group["prox"]),
            start=group["start"], metric=group["metric"], statistics=group["statistics"],
            loss_reduction=group["loss_reduction"], init_metric_scale=float(group["init_metric_scale"]),
            bias_correction=bool(group["bias_correction"]),
            relative_damping=bool(group["relative_damping"]), relative_prox=bool(group["relative_prox"]),
            current_floor=bool(group["current_floor"]), precondition_momentum=bool(group["precondition_momentum"]),
            momentum_rank=group["momentum_rank"] or b.shape[1], seed=self._site_seed(group, index),
            grad_coeff=ctx.grad_coeff, rows=rows, reduce=ctx.reduce,
            row_sums_offset=site.dead_sx,
        )
