"""Training-loop habits, continued (``test_loop_semantics``): a double backward through the LoRA
branches (a gradient penalty) is refused or exact, and float32 master factors keep what bf16
factors would round away."""

import pytest
import torch
from test_loop_semantics import CAPTURED, F64, OPTIMIZERS, assert_same, backward, needs_peft
from training_cases import batch, loss_fn, make_model
from torch import nn

import oplora


# -- 5. double backward ----------------------------------------------------------------------------

def penalised_loss(model, x, y, weight=1.0):
    """The loss plus ``weight`` x the squared norm of its gradient w.r.t. the input (through every
    LoRA branch's backward, differentiated again by the final backward)."""
    x = x.clone().requires_grad_(True)
    loss = loss_fn(model, x, y)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    return loss + weight * gx.square().sum()


@pytest.mark.parametrize("name", CAPTURED)
def test_an_input_gradient_penalty_through_the_lora_layers_is_refused(name):
    model = make_model(dtype=F64)
    opt = OPTIMIZERS[name](model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0, dtype=F64)
    penalised_loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"LoRA layer '\d'.*create_graph=True.*second-order.*RiemannianLoRA"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state


@pytest.mark.parametrize("name", CAPTURED)
def test_a_create_graph_pass_left_out_of_the_loss_changes_nothing(name):
    model, twin = make_model(dtype=F64), make_model(dtype=F64)
    opt, opt_twin = OPTIMIZERS[name](model), OPTIMIZERS[name](twin)
    for step in range(2):
        x, y = batch(step, dtype=F64)
        opt.zero_grad()
        xg = x.clone().requires_grad_(True)
        loss = loss_fn(model, xg, y)
        torch.autograd.grad(loss, xg, create_graph=True)  # a diagnostic, never back-propagated
        loss.backward()
        opt.step()
        opt_twin.zero_grad()
        loss_fn(twin, x, y).backward()
        opt_twin.step()
    assert_same(model, twin)


def test_riemannian_steps_the_penalised_gradient_exactly():
    model = make_model(dtype=F64)
    opt = oplora.RiemannianLoRA(model, lr=0.05)
    x, y = batch(0, dtype=F64)
    penalised_loss(model, x, y).backward()
    opt.step()  # it steps from .grad, which autograd computed with the second-order terms


# -- 6. float32 master factors for bf16 factors ------------------------------------------------------

def linear_model(dtype):
    """One LoRA layer under a loss linear in its output: G = s D^T X does not depend on the
    factors, so a bf16 model and a float32 one with the same (bf16) values see the same G."""
    torch.manual_seed(0)
    layer = oplora.LoRALinear(nn.Linear(24, 20), r=4, alpha=4)
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    return layer.to(torch.bfloat16).to(dtype)


def linear_run(dtype, steps=5, **kw):
    layer = linear_model(dtype)
    opt = oplora.ScaledOPLoRA(layer, lr=1e-3, seed=0, **kw)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 20, generator=gen).to(torch.bfloat16).to(dtype)
    for _ in range(steps):
        x = torch.randn(32, 24, generator=gen).to(torch.bfloat16).to(dtype)
        opt.zero_grad()
        (layer(x) * w).sum().backward()
        opt.step()
    return layer, opt


def test_master_factors_keep_the_updates_bf16_factors_round_away():
    reference, _ = linear_run(torch.float32)
    plain, _ = linear_run(torch.bfloat16)
    layer, opt = linear_run(torch.bfloat16, master_factors=True)
    state = opt.state[layer.lora_B.weight]
    assert state["master_B"].dtype == state["master_A"].dtype == state["momentum_U"].dtype == torch.float32
    start = linear_model(torch.bfloat16)
    for name, master in (("lora_B", state["master_B"]), ("lora_A", state["master_A"])):
        got, want = getattr(layer, name).weight, getattr(reference, name).weight.detach()
        assert torch.equal(got, master.to(torch.bfloat16))  # the factors are the masters rounded ...
        torch.testing.assert_close(master, want, rtol=1e-5, atol=1e-7)  # ... which follow the float32 run
        first = getattr(start, name).weight
        moved = [int((w.to(torch.bfloat16) != first).sum()) for w in (getattr(plain, name).weight, got, want)]
        assert moved[0] < 0.75 * moved[2] and abs(moved[1] - moved[2]) <= 1, moved  # bf16 alone loses updates


def test_master_factors_follow_factors_changed_outside_the_optimizer():
    layer, opt = linear_run(torch.bfloat16, steps=2, master_factors=True)
    state = opt.state[layer.lora_B.weight]
    before = state["master_B"].clone()
    with torch.no_grad():
        layer.lora_B.weight.mul_(0.5)  # a re-initialisation, a weights reload ...
    x = torch.randn(8, 24).to(torch.bfloat16)
    opt.zero_grad()
    layer(x).sum().backward()
    opt.step()
    # The masters restarted from the halved factors (kept, they would have undone the change).
    assert float((state["master_B"] - 0.5 * before).abs().max()) < 0.01 * float(before.abs().max())
    assert torch.equal(layer.lora_B.weight, state["master_B"].to(torch.bfloat16))


def test_master_factors_change_nothing_for_float32_factors():
    plain, _ = linear_run(torch.float32, steps=2)
    layer, opt = linear_run(torch.float32, steps=2, master_factors=True)
    assert torch.equal(plain.lora_B.weight, layer.lora_B.weight)
    assert "master_B" not in opt.state[layer.lora_B.weight]
    with pytest.raises(ValueError, match="master_factors"):
        oplora.OPLoRA(make_model(), master_factors=1)


@needs_peft
@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_the_second_order_check_passes_every_layer_kind_without_a_penalty(name):
    """A ``create_graph`` pass through every kind (Embedding with a ``padding_idx`` token among the
    ids, Conv1d/2d/3d, Linear) left out of the loss: the check reads every kind's rows and steps."""
    from layer_cases import mixed_batch, mixed_loss, mixed_model

    model, twin = mixed_model(), mixed_model()
    for m in (model, twin):
        m.base_model.model.emb.base_layer.padding_idx = 0  # autograd leaves grad_A's column 0 at zero
    opt, opt_twin = OPTIMIZERS[name](model), OPTIMIZERS[name](twin)
    batch_ = mixed_batch(0)
    batch_[0][:, 0] = 0
    loss = mixed_loss(model, batch_)
    factors = [site.A for site in opt._sites]
    torch.autograd.grad(loss, factors, create_graph=True)  # e.g. a gradient-norm diagnostic
    assert all(site.second_order for site in opt._sites)
    loss.backward()
    opt.step()
    mixed_loss(twin, batch_).backward()
    opt_twin.step()
    assert_same(model, twin)


def test_the_second_order_note_lasts_until_the_step():
    """A penalty's graph built before ``zero_grad()`` and back-propagated after it is still seen;
    the step clears the note, so the next clean step is not checked."""
    model = make_model(dtype=F64)
    opt = OPTIMIZERS["oplora"](model)
    x, y = batch(0, dtype=F64)
    total = penalised_loss(model, x, y)
    opt.zero_grad()
    total.backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
    assert not any(site.second_order for site in opt._sites)
    opt.zero_grad()
    backward(model, 1)
    opt.step()
