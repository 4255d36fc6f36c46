"""Gradient clipping of the implicit gradient (SPEC section 3, "Gradient clipping"):
``max_grad_norm`` on every optimizer, ``grad_norm()``, the norm against an explicit m x n G."""

import math

import pytest
import torch
from torch import nn

import oplora
from oplora.optim.clipping import grad_sq_norm

from training_cases import batch, loss_fn, make_model

CLIPPED = {
    "oplora": lambda m, **kw: oplora.OPLoRA(m, lr=0.05, momentum=0.9, seed=0, **kw),
    "scaled": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, **kw),
    "svd": lambda m, **kw: oplora.SVDLoRA(m, lr=0.05, momentum=0.5, **kw),
    "riemannian": lambda m, **kw: oplora.RiemannianLoRA(m, lr=0.05, base="adamw", **kw),
}


def explicit_norm(model, x, y):
    """The total norm from an explicit m x n parameter per LoRA layer: the model's forward with
    ``s B A`` replaced by ``s P`` (P = B A, a leaf), so that autograd's ``P.grad`` is G itself."""
    ps = [(model[i].lora_B.weight @ model[i].lora_A.weight).detach().double().requires_grad_(True) for i in (0, 2)]
    h = x.double()
    for (i, act), p in zip(((0, torch.tanh), (2, None)), ps):
        base = model[i].base_layer
        bias = None if base.bias is None else base.bias.double()
        h = nn.functional.linear(h, base.weight.double(), bias) + model[i].scaling * h @ p.mT
        h = act(h) if act is not None else h
    others = [model[2].base_layer.bias]
    bias64 = [b.detach().double().requires_grad_(True) for b in others]
    # Re-run the last layer's bias as a leaf so that its gradient is measured too.
    h = h - others[0].double() + bias64[0]
    loss = 0.5 * (h - y.double()).square().sum(1).mean()
    grads = torch.autograd.grad(loss, ps + bias64)
    return math.sqrt(sum(float(g.square().sum()) for g in grads))


def factor_norm(model, x, y):
    """clip_grad_norm_'s total over every trainable parameter's gradient (RiemannianLoRA's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model, x, y), params)
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


@pytest.mark.parametrize("method", ["rows", "explicit", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_sq_norm_matches_the_explicit_gradient(method, dtype):
    gen = torch.Generator().manual_seed(3)
    sizes, m, n = (5, 1, 13), 7, 11
    chunks = [(torch.randn(t, n, generator=gen, dtype=dtype), torch.randn(t, m, generator=gen, dtype=dtype))
              for t in sizes]
    g = sum(d.double().mT @ x.double() for x, d in chunks)
    got = grad_sq_norm(chunks, method=method, block=4)  # blocks smaller than the chunks
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, g.square().sum(), rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0)


def test_grad_sq_norm_of_a_cancelling_batch_is_zero_not_negative():
    x = torch.randn(4, 6, dtype=torch.float64)
    d = torch.randn(4, 5, dtype=torch.float64)
    got = grad_sq_norm([(x, d), (x, -d)], method="rows")
    assert 0.0 <= float(got) < 1e-20


def test_grad_sq_norm_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="method"):
        grad_sq_norm([(torch.ones(2, 3), torch.ones(2, 4))], method="cols")


@pytest.mark.parametrize("name", list(CLIPPED))
def test_grad_norm_is_the_explicit_total_norm(name):
    model = make_model(dtype=torch.float64)
    opt = CLIPPED[name](model, max_grad_norm=math.inf)
    x, y = batch(dtype=torch.float64)
    oracle = factor_norm(model, x, y) if name == "riemannian" else explicit_norm(model, x, y)
    # Two micro-batches of the same rows: the step's gradient is their sum (accumulation).
    for half in (slice(0, 10), slice(10, None)):
        (loss_fn(model, x[half], y[half]) * (x[half].shape[0] / x.shape[0])).backward()
    opt.step()
    assert opt.grad_norm() == pytest.approx(oracle, rel=1e-10)


@pytest.mark.parametrize("name", list(CLIPPED))
def test_a_clipped_step_is_the_step_on_the_loss_scaled_by_the_clip_coefficient(name):
    max_norm = 0.05
    clipped, twin = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    opt_clipped = CLIPPED[name](clipped, max_grad_norm=max_norm)
    opt_twin = CLIPPED[name](twin)
    coeffs = []
    for seed in range(3):
        x, y = batch(seed, dtype=torch.float64)
        norm = factor_norm(twin, x, y) if name == "riemannian" else explicit_norm(twin, x, y)
        coeff = min(1.0, max_norm / (norm + 1e-6))
        coeffs.append(coeff)
        opt_clipped.zero_grad()
        loss_fn(clipped, x, y).backward()
        opt_clipped.step()
        assert opt_clipped.grad_norm() == pytest.approx(norm, rel=1e-8)
        opt_twin.zero_grad()
        (coeff * loss_fn(twin, x, y)).backward()
        opt_twin.step()
    assert max(coeffs) < 1.0  # every step was clipped
    for p, q in zip(clipped.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(CLIPPED))
def test_clipping_above_the_norm_changes_nothing(name):
    free, loose = make_model(), make_model()
    opt_free, opt_loose = CLIPPED[name](free), CLIPPED[name](loose, max_grad_norm=1e6)
    for seed in range(2):
        x, y = batch(seed)
        for model, opt in ((free, opt_free), (loose, opt_loose)):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
    assert opt_free.grad_norm() is None
    assert 0.0 < opt_loose.grad_norm() < 1e6
    for p, q in zip(free.parameters(), loose.parameters()):
        assert torch.equal(p, q)


def train_with_norms(model, opt, scaler=None):
    """Three steps (through ``scaler`` when given); the grad_norm() of each."""
    norms = []
    for seed in range(3):
        x, y = batch(seed)
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        norms.append(opt.grad_norm())
    return norms


@pytest.mark.parametrize("name", ["oplora", "riemannian"])
def test_grad_norm_under_grad_scaler_is_the_unscaled_norm(name):
    plain, scaled = make_model(), make_model()
    norms = train_with_norms(plain, CLIPPED[name](plain, max_grad_norm=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert train_with_norms(scaled, CLIPPED[name](scaled, max_grad_norm=0.1), scaler) == pytest.approx(norms, rel=1e-5)
    assert min(norms) > 0.1  # clipped every step
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CLIPPED))
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True, -math.inf])
def test_bad_max_grad_norm_is_refused(name, bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        CLIPPED[name](make_model(), max_grad_norm=bad)


def test_max_grad_norm_lives_in_the_lora_group_and_can_change():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.05, seed=0, max_grad_norm=1.0)
    assert opt.lora_group["max_grad_norm"] == 1.0
    opt.lora_group["max_grad_norm"] = None
    x, y = batch()
    loss_fn(model, x, y).backward()
    opt.step()
    assert opt.grad_norm() is None
