"""Each optimizer's first steps against SPEC section 3, computed independently in float64.

The oracle does not use capture or autograd: for a single LoRA layer under the loss
``0.5 * mean_t ||y_t - target_t||^2`` it forms ``D = (Y - target) / T`` and ``G = s D^T X``
explicitly and applies the SPEC formulas with the explicit m x n matrices of ``tests/explicit.py``.
"""

import pytest
import torch
from torch import nn

import oplora
from oplora.optim import functional as F

from explicit import explicit_oplora_step, explicit_svd_step, matrix_power_psd, rel_err

N, M, R, T = 12, 10, 3, 16
SCALE = 2.0  # alpha / r


def make_layer(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = oplora.LoRALinear(nn.Linear(N, M, dtype=dtype), r=R, alpha=SCALE * R)
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    return layer


def batches(steps, seed=1, rows=T):
    gen = torch.Generator().manual_seed(seed)
    # Features of different scales, so that the K-FAC metric is far from the identity.
    scales = torch.logspace(-0.5, 0.5, N, dtype=torch.float64)
    return [(torch.randn(rows, N, generator=gen, dtype=torch.float64) * scales,
             torch.randn(rows, M, generator=gen, dtype=torch.float64)) for _ in range(steps)]


def loss_fn(out, y):
    return 0.5 * (out - y).square().sum(1).mean()


def explicit_grad(layer, b, a, x, y):
    """D and G = s D^T X from the explicit model output with factors (b, a)."""
    w0, b0 = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    out = x @ w0.T + b0 + SCALE * x @ (b @ a).T
    d = (out - y) / x.shape[0]
    return d, SCALE * d.T @ x


def train(opt, layer, data):
    for x, y in data:
        opt.zero_grad()
        loss_fn(layer(x), y).backward()
        opt.step()


def factors(layer):
    return layer.lora_B.weight.detach().clone(), layer.lora_A.weight.detach().clone()


@pytest.mark.parametrize("momentum, dampening, iters, prox, start", [
    (0.0, 0.0, 1, 1e-2, "A"),
    (0.9, 0.0, 1, 1e-2, "A"),
    (0.8, 0.3, 2, 0.0, "A"),
    (0.5, 0.5, 0, 1e-1, "A"),
    (0.9, 0.1, 1, 1e-2, "B"),
])
def test_oplora_steps_match_spec(momentum, dampening, iters, prox, start):
    layer = make_layer()
    lr = 0.02
    opt = oplora.OPLoRA(layer, lr=lr, momentum=momentum, dampening=dampening, iters=iters, prox=prox,
                        start=start, seed=7)
    b, a = factors(layer)
    mom = None
    if momentum:
        um, vm = F.init_momentum(b, a, R, opt._site_seed(opt.lora_group, 0))
        mom = (um, vm)
        assert torch.equal(um, torch.zeros(M, R, dtype=torch.float64))
    data = batches(3)
    for x, y in data:
        _, g = explicit_grad(layer, b, a, x, y)
        b, a, mom = explicit_oplora_step(b, a, g, mom, lr=lr, momentum=momentum, dampening=dampening,
                                         iters=iters, prox=prox, start=start)
    train(opt, layer, data)
    assert rel_err(layer.lora_B.weight, b) < 1e-8
    assert rel_err(layer.lora_A.weight, a) < 1e-8
    state = opt.state[layer.lora_B.weight]
    assert state["step"] == 3
    if momentum:
        assert rel_err(state["momentum_U"] @ state["momentum_V"], mom[0] @ mom[1]) < 1e-8
    else:
        assert "momentum_U" not in state


@pytest.mark.parametrize("relative, start, zero_b", [
    (True, "A", False),
    (True, "auto", True),
    (False, "auto", True),
    (True, "auto", False),
])
@pytest.mark.parametrize("scaled", [False, True])
def test_relative_prox_and_auto_start_match_spec(relative, start, zero_b, scaled):
    """``relative_prox``: each half-step's weight is prox x the mean squared singular value of its
    (metric-weighted) fixed factor; ``start="auto"``: B side first at the first step of a problem
    whose start B is zero (PEFT's B = 0, the momentum's Um = 0), A side first otherwise."""
    layer = make_layer()
    if zero_b:
        nn.init.zeros_(layer.lora_B.weight)
    lr, prox, b1 = 0.05, 1e-1, 0.8
    if scaled:
        opt = oplora.ScaledOPLoRA(layer, lr=lr, betas=(b1, 0.9), metric_power=0.5, bias_correction=True,
                                  relative_damping=True, damping=1e-2, prox=prox, relative_prox=relative,
                                  start=start, current_floor=False, precondition_momentum=False, seed=3)
    else:
        opt = oplora.OPLoRA(layer, lr=lr, momentum=b1, prox=prox, relative_prox=relative, start=start, seed=3)
    b, a = factors(layer)
    a_start = a.clone()
    mom = F.init_momentum(b, a, R, opt._site_seed(opt.lora_group, 0))
    d_in, d_out = torch.zeros(N, dtype=torch.float64), torch.zeros(M, dtype=torch.float64)
    data = batches(3)
    for t, (x, y) in enumerate(data, 1):
        d, g = explicit_grad(layer, b, a, x, y)
        side = "A" if start == "A" else ("B" if t == 1 and zero_b else "A")
        mom_side = "A" if start == "A" else ("B" if t == 1 else "A")
        kw = dict(lr=lr, momentum=b1, iters=1, prox=prox, start=side, relative=relative, mom_start=mom_side)
        if scaled:
            branch = SCALE * d
            d_in = 0.9 * d_in + 0.1 * x.square().mean(0)
            d_out = 0.9 * d_out + 0.1 * x.shape[0] * branch.square().sum(0)
            c2 = 1 - 0.9**t
            met = (matrix_power_psd(d_out / c2, 1e-2, 0.5, True), matrix_power_psd(d_in / c2, 1e-2, 0.5, True))
            b, a, mom = explicit_oplora_step(b, a, g, mom, dampening=b1, metric=met, step_scale=1 / (1 - b1**t), **kw)
        else:
            b, a, mom = explicit_oplora_step(b, a, g, mom, dampening=0.0, **kw)
        if t == 1 and zero_b:
            # From B = 0, only the B side first (or a relative prox) lets A move at the first step.
            assert (rel_err(a, a_start) > 1e-6) == (side == "B")
    train(opt, layer, data)
    assert rel_err(layer.lora_B.weight, b) < 1e-8
    assert rel_err(layer.lora_A.weight, a) < 1e-8
    state = opt.state[layer.lora_B.weight]
    assert rel_err(state["momentum_U"] @ state["momentum_V"], mom[0] @ mom[1]) < 1e-8


@pytest.mark.parametrize("metric, statistics, loss_reduction, power, corrected, relative", [
    ("diag", "kfac", "mean", 1.0, False, False),
    ("diag", "kfac", "sum", 0.5, False, False),
    ("dense", "kfac", "mean", 0.5, False, False),
    ("diag", "shampoo", "mean", 0.25, False, False),
    ("dense", "shampoo", "sum", 0.25, False, False),
    ("diag", "kfac", "mean", 0.5, True, False),
    ("diag", "kfac", "mean", 1.0, False, True),
    ("diag", "kfac", "sum", 0.5, True, True),
    ("dense", "kfac", "mean", 0.5, True, True),
    ("diag", "shampoo", "mean", 0.25, True, True),
])
def test_scaled_oplora_steps_match_spec(metric, statistics, loss_reduction, power, corrected, relative):
    """The papers' statistics (started at ``init``, damping absolute) and the package's options:
    ``bias_correction`` (EMAs from zero, the metric from ``d / (1 - b2^t)``, the step from the
    momentum average divided by ``1 - b1^t``) and ``relative_damping`` (damping x mean of d)."""
    layer = make_layer()
    lr, betas, damping, prox, init = 0.05, (0.8, 0.9), 0.1, 1e-2, 0.5
    opt = oplora.ScaledOPLoRA(layer, lr=lr, betas=betas, damping=damping, metric_power=power, prox=prox,
                              metric=metric, statistics=statistics, loss_reduction=loss_reduction,
                              init_metric_scale=None if corrected else init, bias_correction=corrected,
                              relative_damping=relative, current_floor=False, precondition_momentum=False, seed=3)
    b, a = factors(layer)
    mom = F.init_momentum(b, a, R, opt._site_seed(opt.lora_group, 0))
    shape = (lambda k: torch.ones(k, dtype=torch.float64)) if metric == "diag" else \
        (lambda k: torch.eye(k, dtype=torch.float64))
    start = 0.0 if corrected else init
    d_in, d_out = start * shape(N), start * shape(M)
    b1, b2 = betas
    data = batches(3)
    for t, (x, y) in enumerate(data, 1):
        d, g = explicit_grad(layer, b, a, x, y)
        rows = x.shape[0]
        c = rows if loss_reduction == "mean" else 1.0 / rows
        branch = SCALE * d  # g_t = s D_t
        if statistics == "kfac":
            new_in = (x.T @ x) / rows if metric == "dense" else x.square().mean(0)
            new_out = c * (branch.T @ branch if metric == "dense" else branch.square().sum(0))
        else:
            new_in = c * (g.T @ g if metric == "dense" else (g.T @ g).diagonal())
            new_out = c * (g @ g.T if metric == "dense" else (g @ g.T).diagonal())
        d_in = b2 * d_in + (1 - b2) * new_in
        d_out = b2 * d_out + (1 - b2) * new_out
        c2 = 1 - b2**t if corrected else 1.0
        met = (matrix_power_psd(d_out / c2, damping, power, relative),
               matrix_power_psd(d_in / c2, damping, power, relative))
        b, a, mom = explicit_oplora_step(b, a, g, mom, lr=lr, momentum=b1, dampening=b1, iters=1,
                                         prox=prox, metric=met, step_scale=1 / (1 - b1**t) if corrected else 1.0)
    train(opt, layer, data)
    state = opt.state[layer.lora_B.weight]
    assert rel_err(state["d_in"], d_in) < 1e-10 and rel_err(state["d_out"], d_out) < 1e-10
    assert rel_err(layer.lora_B.weight, b) < 1e-8
    assert rel_err(layer.lora_A.weight, a) < 1e-8
    assert rel_err(state["momentum_U"] @ state["momentum_V"], mom[0] @ mom[1]) < 1e-8


@pytest.mark.parametrize("floor, averaged", [(True, False), (False, True), (True, True)])
def test_scaled_current_floor_and_preconditioned_momentum_match_spec(floor, averaged):
    """``current_floor``: the metric reads ``max(d_hat, this step's statistics)``;
    ``precondition_momentum``: the momentum averages ``M_out^-1 G M_in^-1`` (its LoRSum weighted by
    the step's metric) and enters the step unpreconditioned. A batch of larger features at step 3
    makes the floor bind."""
    layer = make_layer()
    lr, b1, b2, damping, prox = 0.05, 0.8, 0.9, 1e-2, 1e-2
    opt = oplora.ScaledOPLoRA(layer, lr=lr, betas=(b1, b2), damping=damping, prox=prox, current_floor=floor,
                              precondition_momentum=averaged, seed=3)
    assert opt.lora_group["bias_correction"] and opt.lora_group["relative_damping"]
    b, a = factors(layer)
    mom = F.init_momentum(b, a, R, opt._site_seed(opt.lora_group, 0))
    d_in, d_out = torch.zeros(N, dtype=torch.float64), torch.zeros(M, dtype=torch.float64)
    data = batches(4)
    data[2] = (data[2][0] * 3.0, data[2][1])
    bound = []
    for t, (x, y) in enumerate(data, 1):
        d, g = explicit_grad(layer, b, a, x, y)
        rows = x.shape[0]
        cur_in, cur_out = x.square().mean(0), rows * (SCALE * d).square().sum(0)
        d_in = b2 * d_in + (1 - b2) * cur_in
        d_out = b2 * d_out + (1 - b2) * cur_out
        c2 = 1 - b2**t
        read_in, read_out = d_in / c2, d_out / c2
        if floor:
            bound.append(bool((cur_in > read_in).any()))
            read_in, read_out = torch.maximum(read_in, cur_in), torch.maximum(read_out, cur_out)
        met = (matrix_power_psd(read_out, damping, 0.5, True), matrix_power_psd(read_in, damping, 0.5, True))
        b, a, mom = explicit_oplora_step(b, a, g, mom, lr=lr, momentum=b1, dampening=b1, iters=1, prox=prox,
                                         metric=met, step_scale=1 / (1 - b1**t), precondition_momentum=averaged)
    train(opt, layer, data)
    assert not floor or bound[2]
    state = opt.state[layer.lora_B.weight]
    assert rel_err(state["d_in"], d_in) < 1e-10 and rel_err(state["d_out"], d_out) < 1e-10
    assert rel_err(layer.lora_B.weight, b) < 1e-8
    assert rel_err(layer.lora_A.weight, a) < 1e-8
    assert rel_err(state["momentum_U"] @ state["momentum_V"], mom[0] @ mom[1]) < 1e-8


def test_scaled_with_power_zero_is_oplora_with_momentum_and_dampening_b1():
    """Without bias correction (the papers' preset): with it the step reads the momentum average
    divided by 1 - b1^t, which OPLoRA's heavy-ball momentum does not."""
    data = batches(5)
    results = []
    for make in (lambda m: oplora.ScaledOPLoRA(m, lr=0.2, betas=(0.7, 0.99), metric_power=0.0, preset="paper",
                                               seed=11),
                 lambda m: oplora.OPLoRA(m, lr=0.2, momentum=0.7, dampening=0.7, seed=11)):
        layer = make_layer()
        train(make(layer), layer, data)
        results.append(factors(layer))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_scaled_metric_changes_the_step():
    """Guard for the test above: with p > 0 the step differs from OPLoRA's."""
    data = batches(2)
    out = []
    for power in (0.0, 1.0):
        layer = make_layer()
        train(oplora.ScaledOPLoRA(layer, lr=0.2, metric_power=power, preset="paper", seed=1), layer, data)
        out.append(layer.lora_A.weight.detach())
    assert rel_err(out[0], out[1]) > 1e-3


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_svdlora_is_the_truncated_svd_step(momentum):
    layer = make_layer()
    lr = 0.03
    opt = oplora.SVDLoRA(layer, lr=lr, momentum=momentum)
    b, a = factors(layer)
    buf = None
    data = batches(3)
    for x, y in data:
        _, g = explicit_grad(layer, b, a, x, y)
        buf = g if buf is None or not momentum else momentum * buf + g
        b, a = explicit_svd_step(b, a, lr * buf, R)
    train(opt, layer, data)
    nb, na = factors(layer)
    assert rel_err(nb @ na, b @ a) < 1e-9
    # Balanced factors: B^T B = A A^T = diag(S_r).
    torch.testing.assert_close(nb.T @ nb, na @ na.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(nb.T @ nb, torch.diag((nb.T @ nb).diagonal()), rtol=1e-8, atol=1e-10)


def test_riemannian_sgd_step_matches_formula():
    layer = make_layer()
    lr, damping = 0.02, 1e-3
    opt = oplora.RiemannianLoRA(layer, lr=lr, base="sgd", damping=damping)
    b, a = factors(layer)
    eye = torch.eye(R, dtype=torch.float64)
    data = batches(3)
    for x, y in data:
        _, g = explicit_grad(layer, b, a, x, y)
        grad_a = torch.linalg.solve(b.T @ b + damping * eye, b.T @ g)
        grad_b = g @ a.T @ torch.linalg.inv(a @ a.T + damping * eye)
        b, a = b - lr * grad_b, a - lr * grad_a
    train(opt, layer, data)
    assert rel_err(layer.lora_B.weight, b) < 1e-9
    assert rel_err(layer.lora_A.weight, a) < 1e-9


def test_riemannian_adamw_is_adamw_on_preconditioned_gradients():
    layer = make_layer()
    twin = make_layer()
    opt = oplora.RiemannianLoRA(layer, lr=0.01, base="adamw", damping=1e-4,
                                base_kwargs={"betas": (0.8, 0.9), "weight_decay": 0.1})
    params = [twin.lora_A.weight, twin.lora_B.weight]
    ref = torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)
    eye = torch.eye(R, dtype=torch.float64)
    for x, y in batches(3):
        for model in (layer, twin):
            for p in model.parameters():
                p.grad = None
            loss_fn(model(x), y).backward()
        a, b = twin.lora_A.weight.detach(), twin.lora_B.weight.detach()
        twin.lora_A.weight.grad = torch.linalg.solve(b.T @ b + 1e-4 * eye, twin.lora_A.weight.grad)
        twin.lora_B.weight.grad = twin.lora_B.weight.grad @ torch.linalg.inv(a @ a.T + 1e-4 * eye)
        ref.step()
        opt.step()
    torch.testing.assert_close(layer.lora_A.weight, twin.lora_A.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.weight, twin.lora_B.weight, rtol=1e-10, atol=1e-12)
    assert opt.lora_group["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("make", [
    lambda m: oplora.OPLoRA(m, lr=0.3, momentum=0.9, seed=2),
    lambda m: oplora.ScaledOPLoRA(m, lr=0.05, seed=2),
    lambda m: oplora.SVDLoRA(m, lr=0.3, momentum=0.5),
    lambda m: oplora.RiemannianLoRA(m, lr=0.3),
], ids=["oplora", "scaled", "svd", "riemannian"])
def test_gradient_accumulation_equals_one_big_batch(make):
    (x, y), = batches(1, rows=32)
    big, small = make_layer(), make_layer()
    opt_big, opt_small = make(big), make(small)
    loss_fn(big(x), y).backward()
    for part in (slice(0, 12), slice(12, 32)):
        rows = part.stop - part.start
        (loss_fn(small(x[part]), y[part]) * rows / 32).backward()
    opt_big.step()
    opt_small.step()
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda m, lr: oplora.OPLoRA(m, lr=lr, momentum=0.9, seed=0),
    lambda m, lr: oplora.OPLoRA(m, lr=lr, momentum=0.0, iters=2, seed=0),
    lambda m, lr: oplora.ScaledOPLoRA(m, lr=lr * 10, bias_correction=True, relative_damping=True, seed=0),
    lambda m, lr: oplora.SVDLoRA(m, lr=lr),
], ids=["oplora", "oplora_iters2", "scaled", "svd"])
def test_float32_small_steps_are_as_accurate_as_their_storage(make):
    """A step of a few ulps of the factors (lr 2e-5): the float32 optimizer's change of ``B A`` is as
    close to the float64 optimizer's as the float64 factors rounded to float32 are -- the start
    point's own term and SVDLoRA's ``B A - lr G`` are computed in float64, so only the storage
    rounds (before: 2-5x that for OPLoRA, 15x for SVDLoRA). One step: each later one would start
    from differently rounded factors."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        layer = oplora.LoRALinear(nn.Linear(64, 48), r=4, alpha=8)
        nn.init.normal_(layer.lora_B.weight, std=0.3)
        layer = layer.to(dtype)
        opt = make(layer, 2e-5)
        start = layer.lora_B.weight.double() @ layer.lora_A.weight.double()
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 64, generator=gen, dtype=torch.float64), torch.randn(32, 48, generator=gen,
                                                                                  dtype=torch.float64)
        loss_fn(layer(x.to(dtype)), y.to(dtype)).backward()
        opt.step()
        out[dtype] = factors(layer)
    step = out[torch.float64][0] @ out[torch.float64][1] - start
    got = out[torch.float32][0].double() @ out[torch.float32][1].double() - start
    stored = out[torch.float64][0].float().double() @ out[torch.float64][1].float().double() - start
    floor = rel_err(stored, start + step - start)
    assert rel_err(got, step) < 1.5 * floor + 1e-6, (rel_err(got, step), floor)
