"""Mixed precision: bf16 models and LoRA factors (computed in float32, stored in bf16), CPU
``torch.autocast`` with bf16, and ``torch.amp.GradScaler`` whose bookkeeping (scale growth and
backoff) runs exactly as with a torch optimizer."""

import pytest
import torch
from torch import nn

import oplora
from oplora.capture import Capture
from oplora.optim import functional as F

from training_cases import OPTIMIZERS, batch, loss_fn, make_model

BF16_RTOL = 2.0**-7  # two bf16 ulps: rounding a float32 result to bf16 and once more on the way


def rel(p, q):
    p, q = p.detach().double(), q.detach().double()
    return float((p - q).norm() / q.norm())


@pytest.mark.parametrize("plan", ["oplora", "scaled"])
def test_bf16_factors_are_stepped_in_float32_and_stored_in_bf16(plan):
    gen = torch.Generator().manual_seed(0)
    m, n, r, rows = 9, 13, 3, 20
    b, a = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    x, g = torch.randn(rows, n, generator=gen), torch.randn(rows, m, generator=gen) * 0.1
    low = [t.to(torch.bfloat16) for t in (b, a, x, g)]
    high = [t.float() for t in low]  # the same values, exactly, in float32
    planner = F.plan_oplora if plan == "oplora" else F.plan_scaled_oplora
    hyper = dict(lr=0.1, iters=1, prox=0.01, start="A", momentum_rank=r, seed=3)
    if plan == "oplora":
        hyper.update(momentum=0.9, dampening=0.0)
    else:
        hyper.update(betas=(0.9, 0.99), damping=0.1, metric_power=1.0, metric="diag", statistics="kfac",
                     loss_reduction="mean", init_metric_scale=1.0)
    got, want = F.run_plans([planner(t[0], t[1], [(t[2], t[3])], {}, **hyper) for t in (low, high)])
    assert got.b.dtype == got.a.dtype == torch.bfloat16
    assert got.state["momentum_U"].dtype == torch.bfloat16
    if plan == "scaled":
        assert got.state["d_in"].dtype == got.state["d_out"].dtype == torch.float32
        torch.testing.assert_close(got.state["d_out"], want.state["d_out"], rtol=1e-6, atol=0)
    # The float32 answer rounded once to bf16: the bf16 path computed in float32.
    assert torch.equal(got.b, want.b.to(torch.bfloat16)) and torch.equal(got.a, want.a.to(torch.bfloat16))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_bf16_model_trains_like_the_float32_model(name):
    high, low = make_model(), make_model(dtype=torch.bfloat16)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in high.state_dict().items()})
    opt_high, opt_low = OPTIMIZERS[name](high), OPTIMIZERS[name](low)
    for seed in range(4):
        x, y = batch(seed)
        for model, opt, dtype in ((high, opt_high, torch.float32), (low, opt_low, torch.bfloat16)):
            opt.zero_grad()
            loss_fn(model, x.to(dtype), y.to(dtype)).backward()
            opt.step()
    for p, q in zip(low.parameters(), high.parameters()):
        assert p.dtype == torch.bfloat16
        assert rel(p, q) < 0.05


def autocast_step(model, opt, x, y, enabled):
    """One step, the forward under bf16 autocast when ``enabled``."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        loss = loss_fn(model, x, y)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("name", ["oplora", "scaled", "riemannian"])
def test_autocast_bf16_steps_close_to_float32(name, monkeypatch):
    dtypes = set()  # the dtypes of the captured X and sD, as they arrive (before any fold)
    add = Capture._add
    monkeypatch.setattr(Capture, "_add", lambda self, site, x, version, g, *rest: (
        dtypes.update((x.dtype, g.dtype)), add(self, site, x, version, g, *rest)))
    plain, cast = make_model(), make_model()
    opt_plain, opt_cast = OPTIMIZERS[name](plain), OPTIMIZERS[name](cast)
    for seed in range(3):
        x, y = batch(seed)
        autocast_step(plain, opt_plain, x, y, enabled=False)
        autocast_step(cast, opt_cast, x, y, enabled=True)
    if name != "riemannian":
        assert torch.bfloat16 in dtypes  # the bf16 activations and gradients were captured
    for p, q in zip(cast.parameters(), plain.parameters()):
        assert p.dtype == torch.float32
        assert rel(p, q) < 0.02


def scaler_run(model, opt, steps, bad_step):
    """Autocast + GradScaler steps (an inf in the input at ``bad_step``); the scaler's scale and
    growth tracker after each step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    trace = []
    for step in range(steps):
        x, y = batch(step)
        if step == bad_step:
            x[0, 0] = float("inf")
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        trace.append((scaler.get_scale(), int(scaler._growth_tracker)))
    return trace


@pytest.mark.parametrize("name", ["oplora", "scaled", "svd", "riemannian"])
def test_grad_scaler_bookkeeping_is_adamws(name):
    model, reference = make_model(), make_model()
    params = [p for p in reference.parameters() if p.requires_grad]
    trace = scaler_run(model, OPTIMIZERS[name](model), 7, bad_step=3)
    want = scaler_run(reference, torch.optim.AdamW(params, lr=1e-3), 7, bad_step=3)
    assert trace == want
    assert [s for s, _ in trace] == [256.0, 512.0, 512.0, 256.0, 256.0, 512.0, 512.0]  # growth, backoff, growth
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_model_with_grad_scaler_and_clipping():
    model = make_model(dtype=torch.bfloat16)
    opt = oplora.ScaledOPLoRA(model, lr=0.1, seed=0, max_grad_norm=1.0, skip_nonfinite=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    start = [p.detach().clone() for p in model.parameters()]
    for seed in range(3):
        x, y = batch(seed, dtype=torch.bfloat16)
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        assert 1.0 < opt.grad_norm() < 100.0  # unscaled, and clipped
    assert opt.skipped_steps == 0 and scaler.get_scale() == 2.0**10
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start) if p.requires_grad)
    assert isinstance(model[0].lora_A, nn.Linear) and model[0].lora_A.weight.dtype == torch.bfloat16
