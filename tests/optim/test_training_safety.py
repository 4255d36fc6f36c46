"""Bad values and bad input in a training loop: non-finite steps raised or skipped
(``skip_nonfinite``), a layer on mixed devices, a model whose structure changed after the
optimizer was built. Each refusal names the layer and moves nothing."""

import pytest
import torch
from torch import nn

import oplora

from training_cases import OPTIMIZERS, batch, loss_fn, make_model, same, snapshot


def backward(model, x, y):
    loss_fn(model, x, y).backward()


def poisoned(seed=1):
    x, y = batch(seed)
    x[3, 2] = float("nan")
    return x, y


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_non_finite_step_raises_naming_the_layer_and_moves_nothing(name):
    model = make_model()
    opt = OPTIMIZERS[name](model)
    backward(model, *batch())
    opt.step()
    snap = snapshot(model, opt)
    opt.zero_grad()
    backward(model, *poisoned())
    what = "gradient of" if name == "riemannian" else "captured X"
    with pytest.raises(FloatingPointError, match=rf"{what}.*LoRA layer '0'.*nothing was updated"):
        opt.step()
    assert same(model, opt, snap) and opt.skipped_steps == 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_nonfinite_skips_the_step_whole_and_counts_it(name):
    model, twin = make_model(), make_model()
    make = OPTIMIZERS[name]
    opt = make(model)
    opt.skip_nonfinite = True
    opt_twin = make(twin)
    for i, seed in enumerate((1, 2, 3)):
        opt.zero_grad()
        backward(model, *batch(seed))
        opt.step()
        opt_twin.zero_grad()
        backward(twin, *batch(seed))
        opt_twin.step()
        if i == 1:  # a poisoned batch between two good ones: nothing of it may remain
            snap = snapshot(model, opt)
            opt.zero_grad()
            backward(model, *poisoned())
            opt.step()
            assert same(model, opt, snap)
            assert all(not site.rows for site in opt._sites)
    assert opt.skipped_steps == 1
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["oplora", "riemannian"])
def test_a_non_finite_gradient_of_another_parameter_is_caught_too(name):
    model = make_model()
    opt = OPTIMIZERS[name](model)
    backward(model, *batch())
    model[2].base_layer.bias.grad[1] = float("inf")
    snap = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"parameter '2.base_layer.bias'"):
        opt.step()
    assert same(model, opt, snap)
    opt.skip_nonfinite = True
    backward(model, *batch())
    model[2].base_layer.bias.grad[1] = float("nan")
    opt.step()
    assert same(model, opt, snap) and opt.skipped_steps == 1


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_skip_nonfinite_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="skip_nonfinite"):
        oplora.OPLoRA(make_model(), skip_nonfinite=bad)


@pytest.mark.parametrize("capture, held", [("rows", "captured X"), ("dense", "folded gradient")])
def test_a_layer_on_mixed_devices_is_refused_naming_it(capture, held):
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.05, capture=capture)
    backward(model, *batch())
    kept = [p.detach().clone() for p in model[2].parameters()]
    # Moving a module between backward() and step(), keeping the Parameter objects (as
    # model.to("cuda") does): the captured rows stay where they were.
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model[0].to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    with pytest.raises(RuntimeError, match=rf"LoRA layer '0' mixes devices: B on meta, {held} on cpu"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), kept))
    assert not opt.state and all(not site.rows for site in opt._sites)


def refused(model, opt, match):
    """step() raises a RuntimeError matching ``match`` and moves nothing."""
    backward(model, *batch())
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert same(model, opt, snap)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_factor_frozen_after_build_is_refused(name):
    model = make_model()
    opt = OPTIMIZERS[name](model)
    model[0].lora_A.weight.requires_grad_(False)
    refused(model, opt, r"LoRA layer '0': only one of its two factors requires grad")


def test_a_base_parameter_unfrozen_after_build_is_refused_and_one_frozen_is_fine():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.05, seed=0)
    model[0].base_layer.weight.requires_grad_(True)
    refused(model, opt, r"unknown to the optimizer.*parameter '0.base_layer.weight'")
    model[0].base_layer.weight.requires_grad_(False)
    model[2].base_layer.bias.requires_grad_(False)  # in the other group: it merely stops training
    opt.zero_grad()
    bias = model[2].base_layer.bias.detach().clone()
    backward(model, *batch())
    opt.step()
    assert torch.equal(model[2].base_layer.bias, bias)
    assert "momentum_U" in opt.state[model[0].lora_B.weight]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_lora_layer_added_after_build_is_refused(name):
    model = make_model()
    model.append(nn.Tanh())
    model.append(nn.Linear(4, 4))
    opt = OPTIMIZERS[name](model)
    oplora.add_lora(model, ["4"], r=2, freeze_base=False)
    refused(model, opt, r"unknown to the optimizer.*LoRA layer '4'")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_lora_layer_removed_after_build_is_refused(name):
    model = make_model()
    opt = OPTIMIZERS[name](model)
    model[2] = model[2].merged()
    refused(model, opt, r"LoRA layer '2' was removed")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_factor_replaced_after_build_is_refused(name):
    model = make_model()
    opt = OPTIMIZERS[name](model)
    model[0].lora_A.weight = nn.Parameter(model[0].lora_A.weight.detach().clone())
    refused(model, opt, r"LoRA layer '0': a factor was replaced")


def test_a_frozen_base_layer_is_the_normal_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    oplora.add_lora(model, ["0", "2"], r=2)  # freezes every base parameter
    opt = oplora.ScaledOPLoRA(model, lr=0.01, seed=0, max_grad_norm=1.0)
    b = model[0].lora_B.weight.detach().clone()
    model(torch.randn(8, 6)).square().mean().backward()  # the input needs no grad either
    opt.step()
    assert not torch.equal(model[0].lora_B.weight, b)
    assert len(opt.param_groups) == 1 and opt.grad_norm() > 0


def test_a_clean_step_reads_no_row_for_the_non_finite_check(monkeypatch):
    """NaN/Inf in the rows shows in the step's products, which are checked instead: a step whose
    values are finite scans only the other parameters' gradients (not a second read of X and sD)."""
    from oplora.optim import _guards

    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.05, capture="rows")
    backward(model, *batch())
    rows = {id(t) for site in opt._sites for x, g, _ in site.chunks for t in (x, g)}
    scanned = []
    real = _guards.first_nonfinite
    monkeypatch.setattr(_guards, "first_nonfinite", lambda ts: (scanned.extend(ts), real(ts))[1])
    opt.step()
    assert scanned and not rows & {id(t) for t in scanned}
