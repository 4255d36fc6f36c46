"""Training-loop habits that act on ``.grad`` mean for the LoRSum optimizers what they mean for
AdamW (SPEC section 3): what is captured lives exactly as long as the factors' ``.grad``
(discarded, zeroed, rescaled by ``clip_grad_norm_``), adapters switched or frozen between steps
are left alone and trained again later, the other optimizer's default lr, double backward
checked against autograd, float32 master factors (those two: ``test_loop_second_order``). Each
against the same loop without the twist, or against autograd's factor gradients."""

import warnings

import pytest
import torch
from torch import nn

import oplora

from training_cases import batch, loss_fn, make_model

try:
    import peft
except ImportError:
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")

F64 = torch.float64
OPTIMIZERS = {
    "oplora": lambda m, **kw: oplora.OPLoRA(m, lr=0.05, momentum=0.9, seed=0, **kw),
    "scaled": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, **kw),
    "svd": lambda m, **kw: oplora.SVDLoRA(m, lr=0.05, momentum=0.5, **kw),
    "riemannian": lambda m, **kw: oplora.RiemannianLoRA(m, lr=0.05, base="adamw", **kw),
}
CAPTURED = ["oplora", "scaled", "svd"]


def backward(model, seed, scale=1.0):
    x, y = batch(seed, dtype=F64)
    (scale * loss_fn(model, x, y)).backward()


def assert_same(model, twin, rtol=1e-10, atol=1e-12):
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def captured_gradient(site):
    g = sum(sd.double().T @ x.double() for x, sd, _ in site.chunks)
    return site.coeff * (g + (site.folded.g.double() if site.folded is not None else 0.0))


def check_against_autograd(opt):
    """autograd's ``grad_A = B^T G``, ``grad_B = G A^T`` with G from what each layer holds."""
    opt._capture.sync()
    for site in opt._sites:
        g = captured_gradient(site)
        a, b = site.A.detach().double(), site.B.detach().double()
        torch.testing.assert_close(site.A.grad.double(), b.T @ g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(site.B.grad.double(), g @ a.T, rtol=1e-9, atol=1e-12)


def lora_factors(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


# -- 1. a discarded backward is discarded ----------------------------------------------------------

DISCARDS = {
    "model.zero_grad()": lambda model, opt: model.zero_grad(),
    "set_to_none=False": lambda model, opt: model.zero_grad(set_to_none=False),
    "p.grad = None": lambda model, opt: [setattr(p, "grad", None) for p in lora_factors(model)],
    "opt.zero_grad()": lambda model, opt: opt.zero_grad(),
}


@pytest.mark.parametrize("capture", ["rows", "auto"])
@pytest.mark.parametrize("how", list(DISCARDS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_discarded_backward_is_not_stepped(name, how, capture):
    kw = {} if name == "riemannian" else {"capture": capture}
    model, twin = make_model(dtype=F64), make_model(dtype=F64)
    opt, opt_twin = OPTIMIZERS[name](model, **kw), OPTIMIZERS[name](twin, **kw)
    for step in range(2):
        opt.zero_grad()
        backward(model, 10 + step)  # a loss spike, a diagnostic pass: thrown away
        DISCARDS[how](model, opt)
        model[2].base_layer.bias.grad = None  # the other parameter's gradient goes too (AdamW steps zeros)
        backward(model, step)
        if name != "riemannian":
            check_against_autograd(opt)
        opt.step()
        opt_twin.zero_grad()
        backward(twin, step)
        opt_twin.step()
    assert_same(model, twin)


def test_discarding_one_factors_gradient_discards_the_layers_rows():
    model = make_model(dtype=F64)
    opt = oplora.OPLoRA(model, lr=0.05, capture="rows")
    backward(model, 0)
    model[0].lora_B.weight.grad = None
    assert opt.capture_bytes() > 0 and not opt._sites[0].rows and opt._sites[1].rows


def test_rows_of_discarded_gradients_are_released_at_the_next_forward():
    model = make_model(dtype=F64)
    opt = oplora.OPLoRA(model, lr=0.05, capture="rows")
    backward(model, 0)
    held = opt._capture.held_bytes()
    assert held > 0
    model.zero_grad()
    x, _ = batch(1, dtype=F64)
    model(x)  # no backward yet: the forward pass of each layer released what it held
    assert opt._capture.held_bytes() == 0 and all(not site.rows for site in opt._sites)


def test_accumulation_after_a_discarded_micro_batch_keeps_the_others():
    """micro-batch 1, then 2 discarded with the gradients zeroed, then 3: the step is 3's alone;
    discarding only clears what came before it."""
    model, twin = make_model(dtype=F64), make_model(dtype=F64)
    opt = oplora.ScaledOPLoRA(model, lr=0.01, seed=0, capture="rows")
    opt_twin = oplora.ScaledOPLoRA(twin, lr=0.01, seed=0, capture="rows")
    backward(model, 1)
    backward(model, 2)
    model.zero_grad(set_to_none=False)
    backward(model, 3)
    backward(model, 4)
    opt.step()
    backward(twin, 3)
    backward(twin, 4)
    opt_twin.step()
    assert_same(model, twin)


# -- 3. a uniform rescale of .grad is applied ------------------------------------------------------

def clip_coefficient(norm, max_norm):
    return min(1.0, max_norm / (norm + 1e-6))


@pytest.mark.parametrize("capture", ["rows", "auto"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_clip_grad_norm_of_the_factors_is_the_step_on_the_scaled_loss(name, capture):
    kw = {} if name == "riemannian" else {"capture": capture}
    model, twin = make_model(dtype=F64), make_model(dtype=F64)
    opt, opt_twin = OPTIMIZERS[name](model, **kw), OPTIMIZERS[name](twin, **kw)
    coeffs = []
    for step in range(3):
        opt.zero_grad()
        backward(model, step)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
        coeffs.append(clip_coefficient(norm, 0.05))
        opt.step()
        opt_twin.zero_grad()
        backward(twin, step, scale=coeffs[-1])
        opt_twin.step()
    assert max(coeffs) < 1.0
    assert_same(model, twin, rtol=1e-8, atol=1e-10)


RESCALED = dict({name: OPTIMIZERS[name] for name in CAPTURED},
                scaled_dense=lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, metric="dense", **kw),
                shampoo=lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, statistics="shampoo",
                                                            metric_power=0.25, **kw))


@pytest.mark.parametrize("capture", ["rows", "dense"])
@pytest.mark.parametrize("name", list(RESCALED))
def test_a_rescale_between_micro_batches_applies_to_the_rows_before_it(name, capture):
    model, twin = make_model(dtype=F64), make_model(dtype=F64)
    opt, opt_twin = RESCALED[name](model, capture=capture), RESCALED[name](twin, capture=capture)
    backward(model, 1)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(0.3)
    backward(model, 2)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # a second rescale, of everything
    check_against_autograd(opt)
    coeff = opt._sites[0].coeff
    assert coeff < 1.0
    opt.step()
    backward(twin, 1, scale=0.3 * coeff)
    backward(twin, 2, scale=coeff)
    opt_twin.step()
    assert_same(model, twin, rtol=1e-8, atol=1e-10)


def test_unscale_and_clip_under_grad_scaler_is_the_plain_clipped_step():
    """The AMP recipe: scale, backward, ``unscale_``, ``clip_grad_norm_``, ``scaler.step``."""
    model, twin = make_model(), make_model()
    opt, opt_twin = OPTIMIZERS["scaled"](model), OPTIMIZERS["scaled"](twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        scaler.unscale_(opt)
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
        scaler.step(opt)
        scaler.update()
        opt_twin.zero_grad()
        (clip_coefficient(norm, 0.05) * loss_fn(twin, x, y)).backward()
        opt_twin.step()
    assert_same(model, twin, rtol=1e-5, atol=1e-6)


CHANGES = {
    "noise added": lambda p: p.grad.add_(torch.randn_like(p.grad) * p.grad.abs().mean()),
    "clip_grad_value_": lambda p: torch.nn.utils.clip_grad_value_([p], float(p.grad.abs().max()) / 2),
    "A and B scaled apart": lambda p: p.grad.mul_(0.5 if p.dim() == 2 and p.shape[0] < p.shape[1] else 2.0),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_other_change_of_the_factor_gradients_warns_once_and_is_not_used(change):
    model, twin = make_model(dtype=F64), make_model(dtype=F64)
    opt, opt_twin = OPTIMIZERS["oplora"](model), OPTIMIZERS["oplora"](twin)
    for step in range(2):
        opt.zero_grad()
        backward(model, step)
        for p in lora_factors(model):
            CHANGES[change](p)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        messages = [str(w.message) for w in caught if "not used" in str(w.message)]
        assert len(messages) == (1 if step == 0 else 0)  # once per optimizer
        if messages:
            assert "max_grad_norm" in messages[0] and "LoRA layer" in messages[0]
        opt_twin.zero_grad()
        backward(twin, step)
        opt_twin.step()
    assert_same(model, twin)


def test_an_unchanged_or_identity_rescaled_gradient_warns_nothing():
    model = make_model(dtype=F64)
    opt = OPTIMIZERS["scaled"](model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(2):
            opt.zero_grad()
            backward(model, step)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # multiplies every .grad by 1.0
            for p in lora_factors(model):
                p.grad = p.grad.clone()  # a new tensor with the same values
            opt.step()
            assert all(site.coeff == 1.0 for site in opt._sites)


# -- 2. adapters switched, frozen, unfrozen ---------------------------------------------------------

@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_adapter_frozen_between_steps_keeps_its_factors_and_state(name):
    model, twin = make_model(dtype=F64), make_model(dtype=F64)
    opt, opt_twin = OPTIMIZERS[name](model), OPTIMIZERS[name](twin)
    for m, o in ((model, opt), (twin, opt_twin)):
        o.zero_grad()
        backward(m, 0)
        o.step()
    layer = model[0]
    frozen = [p.detach().clone() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[layer.lora_B.weight].items()}
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    opt.zero_grad()
    backward(model, 1)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip((layer.lora_A.weight, layer.lora_B.weight), frozen))
    now = opt.state[layer.lora_B.weight]
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) if torch.is_tensor(v) else now[k] == v
                                              for k, v in state.items())
    # The other layer trained as it would have (the frozen layer's values are those the twin had).
    opt_twin.zero_grad()
    backward(twin, 1)
    opt_twin.step()
    torch.testing.assert_close(model[2].lora_B.weight, twin[2].lora_B.weight, rtol=1e-10, atol=1e-12)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    opt.zero_grad()
    backward(model, 2)
    opt.step()
    assert not torch.equal(layer.lora_B.weight, frozen[1])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16, dtype=F64), nn.Linear(16, 4, dtype=F64)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def two_adapters(seed=0):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(target_modules=["fc1", "fc2"], r=3, lora_alpha=6, init_lora_weights=False)
    model = peft.get_peft_model(Net(), cfg, adapter_name="one")
    model.add_adapter("two", cfg)
    model.set_adapter("one")
    return model


def peft_step(model, opt, seed):
    opt.zero_grad()
    x, y = batch(seed, dtype=F64)
    loss_fn(model, x, y).backward()
    opt.step()


def adapter(model, name):
    inner = model.base_model.model
    return [inner.fc1.lora_A[name].weight, inner.fc1.lora_B[name].weight, inner.fc2.lora_B[name].weight]


@needs_peft
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_peft_set_adapter_between_steps_trains_the_active_adapter_and_keeps_the_other(name):
    model, twin = two_adapters(), two_adapters()
    opt = OPTIMIZERS[name](model)
    assert len(opt.lora_layers) == 4  # "two", frozen at build, is covered
    peft_step(model, opt, 0)
    a_after = [p.detach().clone() for p in adapter(model, "one")]
    a_state = {k: v for k, v in opt.state[adapter(model, "one")[1]].items()}
    model.set_adapter("two")  # PEFT freezes "one" and unfreezes "two"
    peft_step(model, opt, 1)
    peft_step(model, opt, 2)
    assert all(torch.equal(p, q) for p, q in zip(adapter(model, "one"), a_after))
    assert opt.state[adapter(model, "one")[1]].keys() == a_state.keys()
    # "two" trained exactly as an optimizer built with "two" active would have trained it
    twin.set_adapter("two")
    twin_opt = OPTIMIZERS[name](twin)
    peft_step(twin, twin_opt, 1)
    peft_step(twin, twin_opt, 2)
    for p, q in zip(adapter(model, "two"), adapter(twin, "two")):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    model.set_adapter("one")
    peft_step(model, opt, 3)
    assert not torch.equal(adapter(model, "one")[1], a_after[1])
    if name != "riemannian":
        assert opt.state[adapter(model, "one")[1]]["step"] == 2 and opt.state[adapter(model, "two")[1]]["step"] == 2


# -- 4. the other optimizer's lr -------------------------------------------------------------------

@pytest.mark.parametrize("make, other_lr", [
    (lambda m: oplora.OPLoRA(m, lr=0.3), 1e-3),
    (lambda m: oplora.SVDLoRA(m, lr=0.3), 1e-3),
    (lambda m: oplora.ScaledOPLoRA(m, lr=0.02), 0.02),
    (lambda m: oplora.RiemannianLoRA(m, lr=0.3), 1e-3),
    (lambda m: oplora.RiemannianLoRA(m, lr=0.02, base="adamw"), 0.02),
    (lambda m: oplora.OPLoRA(m, lr=0.3, other="sgd"), torch.optim.SGD([nn.Parameter(torch.ones(1))]).defaults["lr"]),
    (lambda m: oplora.OPLoRA(m, lr=0.3, other_kwargs={"lr": 5e-4}), 5e-4),
], ids=["oplora", "svd", "scaled", "riemannian_sgd", "riemannian_adamw", "oplora_other_sgd", "explicit"])
def test_the_other_lr_defaults_to_its_own_default_for_sgd_scale_optimizers(make, other_lr):
    opt = make(make_model())
    assert opt.param_groups[1]["lr"] == other_lr


def test_an_other_optimizer_without_a_default_lr_asks_for_one():
    class NoDefault(torch.optim.SGD):
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)

    with pytest.raises(ValueError, match=r"no default lr: pass other_kwargs=\{'lr': \.\.\.\}"):
        oplora.OPLoRA(make_model(), other=NoDefault)
    assert oplora.OPLoRA(make_model(), other=NoDefault, other_kwargs={"lr": 0.1}).param_groups[1]["lr"] == 0.1
