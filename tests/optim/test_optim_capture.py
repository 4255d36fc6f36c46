"""Capture of X and sD, LoRA layer discovery, ``LoRALinear``/``add_lora``, hooks' lifetime.

The capture check is independent of the optimizers: autograd's own factor gradients satisfy
``grad_A = B^T G`` and ``grad_B = G A^T`` with ``G = sum_j sD_j^T X_j``; that identity holds only
when X is the input after dropout and sD carries the layer's scaling (alpha / r, rsLoRA's
alpha / sqrt(r)), for every adapter separately.
"""

import gc
import math
import re
import warnings

import pytest
import torch
from torch import nn

import oplora
from oplora.capture.sites import find_lora_sites

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self, n=12, h=16, m=6, dtype=torch.float64):
        super().__init__()
        self.fc1 = nn.Linear(n, h, dtype=dtype)
        self.fc2 = nn.Linear(h, m, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class EmbedNet(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=groups)
        self.fc = nn.Linear(8, 4)

    def forward(self, idx):
        h = self.emb(idx).transpose(1, 2)
        return self.fc(self.conv(h).mean(-1))


def lora_net(dropout=0.0, rslora=False):
    net = Net()
    oplora.add_lora(net, ["fc1", "fc2"], r=3, alpha=6, dropout=dropout, rslora=rslora)
    for mod in (net.fc1, net.fc2):
        nn.init.normal_(mod.lora_B.weight)
    return net


def peft_net(dropout=0.0, rslora=False, adapters=("default",)):
    base = Net()
    cfg = peft.LoraConfig(target_modules=["fc1", "fc2"], r=3, lora_alpha=6, lora_dropout=dropout,
                          use_rslora=rslora, init_lora_weights=False)
    model = peft.get_peft_model(base, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfg)
    return model


def check_gradient_identity(opt):
    """autograd's grad_A, grad_B equal B^T G, G A^T with G from the captured chunks (and the rows
    folded into the dense gradient)."""
    checked = 0
    for site in opt._sites:
        if not site.rows:
            continue
        g = sum(sd.double().T @ x.double() for x, sd, _ in site.chunks)
        if site.folded is not None:
            g = g + site.folded.g.double()
        a, b = site.A.detach().double(), site.B.detach().double()
        torch.testing.assert_close(site.A.grad.double(), b.T @ g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(site.B.grad.double(), g @ a.T, rtol=1e-10, atol=1e-12)
        checked += 1
    return checked


# -- LoRALinear and add_lora -------------------------------------------------------------------

def test_lora_linear_computes_base_plus_scaled_update():
    torch.manual_seed(1)
    base = nn.Linear(7, 5, dtype=torch.float64)
    layer = oplora.LoRALinear(base, r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    expected = base(x) + 2.0 * x @ (layer.lora_B.weight @ layer.lora_A.weight).T
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.weight.shape == (2, 7) and layer.lora_B.weight.shape == (5, 2)
    merged = layer.merged()
    torch.testing.assert_close(merged(x), expected)
    assert oplora.LoRALinear(nn.Linear(7, 5), r=4, alpha=4, rslora=True).scaling == pytest.approx(2.0)


def test_lora_linear_starts_as_the_base_layer():
    base = nn.Linear(7, 5)
    x = torch.randn(3, 7)
    torch.testing.assert_close(oplora.LoRALinear(base, r=2)(x), base(x))


def test_add_lora_targets_by_suffix_regex_and_callable():
    net = nn.Sequential(Net(), Net())
    assert oplora.add_lora(net, ["fc1"], r=2) == ["0.fc1", "1.fc1"]
    assert isinstance(net[0].fc1, oplora.LoRALinear) and isinstance(net[0].fc2, nn.Linear)
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    net = nn.Sequential(Net(), Net())
    assert oplora.add_lora(net, r"1\.fc\d", r=2, freeze_base=False) == ["1.fc1", "1.fc2"]
    assert net[0].fc1.weight.requires_grad
    net = Net()
    assert oplora.add_lora(net, lambda name, mod: mod.out_features == 6, r=2) == ["fc2"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"target_modules": ["nope"]}, ValueError, "no submodule"),
    ({"target_modules": ["emb"]}, TypeError, "not an nn.Linear"),
    ({"target_modules": []}, ValueError, "target_modules"),
    ({"target_modules": ["fc"], "r": 0}, ValueError, "r must be"),
    ({"target_modules": ["fc"], "alpha": -1.0}, ValueError, "alpha"),
    ({"target_modules": ["fc"], "dropout": 1.0}, ValueError, "dropout"),
])
def test_add_lora_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        oplora.add_lora(EmbedNet(), **kwargs)


# -- capture -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lora_net, peft_net], ids=["oplora", "peft"])
@pytest.mark.parametrize("dropout, rslora", [(0.0, False), (0.5, False), (0.3, True)])
def test_captured_pairs_reproduce_autograd_factor_gradients(make, dropout, rslora):
    model = make(dropout=dropout, rslora=rslora)
    model.train()
    opt = oplora.OPLoRA(model, lr=0.1, capture="rows")
    x = torch.randn(5, 4, 12, dtype=torch.float64)
    model(x).square().mean().backward()
    assert check_gradient_identity(opt) == 2
    site = opt._sites[0]
    (chunk_x, chunk_g, s), = site.chunks
    assert chunk_x.shape == (20, 12) and chunk_g.shape == (20, 16)
    assert s == pytest.approx(6 / math.sqrt(3) if rslora else 2.0)
    if dropout > 0:  # X is the input after dropout: about a fraction `dropout` of it is zeroed
        zero = (chunk_x == 0).double().mean().item()
        assert abs(zero - dropout) < 0.15


def test_peft_several_adapters_are_separate_sites():
    model = peft_net(adapters=("first", "second"))
    model.base_model.set_adapter(["first", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    opt = oplora.OPLoRA(model, lr=0.1)
    assert sorted(opt.lora_layers) == sorted(f"base_model.model.{layer}[{a}]" for layer in ("fc1", "fc2")
                                             for a in ("first", "second"))
    model(torch.randn(8, 12, dtype=torch.float64)).square().sum().backward()
    assert check_gradient_identity(opt) == 4


def test_peft_inactive_adapter_is_neither_trained_nor_captured():
    model = peft_net(adapters=("first", "second"))
    model.set_adapter("second")
    first = {n: p.detach().clone() for n, p in model.named_parameters() if ".first." in n}
    opt = oplora.OPLoRA(model, lr=0.5)
    assert len(opt.lora_layers) == 4  # every adapter is covered: the frozen one trains once it is set
    second_before = model.base_model.model.fc1.lora_A["second"].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 12, dtype=torch.float64)).square().sum().backward()
        opt.step()
    for n, p in model.named_parameters():
        if ".first." in n:
            assert torch.equal(p, first[n]), n
    assert not torch.equal(model.base_model.model.fc1.lora_A["second"].weight, second_before)
    assert all(site.name.endswith("[second]") for site in opt._sites if site.B in opt.state)


def test_nothing_captured_without_backward_or_under_no_grad():
    model = lora_net()
    opt = oplora.OPLoRA(model, capture="rows")
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    model(x)  # graph built, never back-propagated
    assert all(not s.rows and not s._pending for s in opt._sites)
    model(x).sum().backward()
    assert all(len(s.chunks) == 1 for s in opt._sites)
    opt.zero_grad()
    assert all(not s.rows for s in opt._sites)
    model(x).sum().backward()
    opt.step()
    assert all(not s.rows for s in opt._sites)


def test_module_called_twice_captures_both_calls():
    layer = oplora.LoRALinear(nn.Linear(6, 6, dtype=torch.float64), r=2)
    nn.init.normal_(layer.lora_B.weight)
    opt = oplora.OPLoRA(layer, capture="rows")
    layer(torch.tanh(layer(torch.randn(5, 6, dtype=torch.float64)))).sum().backward()
    assert len(opt._sites[0].chunks) == 2
    assert check_gradient_identity(opt) == 1


def test_close_and_garbage_collection_remove_the_hooks():
    model = lora_net()

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    opt = oplora.OPLoRA(model)
    assert hook_count() == 4
    opt.close()
    assert hook_count() == 0
    model(torch.randn(3, 12, dtype=torch.float64)).sum().backward()
    assert all(not s.rows for s in opt._sites)
    opt = oplora.ScaledOPLoRA(model)
    assert hook_count() == 4
    del opt
    gc.collect()
    assert hook_count() == 0


def test_model_without_lora_raises_and_one_all_frozen_is_covered():
    with pytest.raises(ValueError, match="no LoRA layer"):
        oplora.OPLoRA(Net())
    model = lora_net()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.warns(UserWarning, match="no LoRA factor of the model requires grad now"):
        opt = oplora.OPLoRA(model, lr=0.1)
    assert opt.lora_layers == ["fc1", "fc2"]
    with pytest.raises(TypeError, match="nn.Module"):
        oplora.OPLoRA(list(lora_net().parameters()))


def test_unsupported_lora_goes_to_other_with_a_warning_or_raises_when_strict():
    cfg = peft.LoraConfig(target_modules=["emb", "conv", "fc"], r=2, lora_alpha=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: merging a grouped convolution is not supported
        model = peft.get_peft_model(EmbedNet(groups=2), cfg)
    with pytest.warns(UserWarning, match=r"conv\[default\]: a grouped convolution") as record:
        opt = oplora.OPLoRA(model, lr=0.1)
    message = next(str(w.message) for w in record if "grouped" in str(w.message))
    assert "emb[default]" not in message and "fc[default]" not in message
    assert opt.lora_layers == ["base_model.model.emb[default]", "base_model.model.fc[default]"]
    other = {id(p) for p in opt.param_groups[1]["params"]}
    conv = model.base_model.model.conv
    assert id(conv.lora_A["default"].weight) in other
    before = conv.lora_A["default"].weight.detach().clone()
    model(torch.randint(0, 20, (4, 5))).square().sum().backward()
    opt.step()
    assert not torch.equal(conv.lora_A["default"].weight, before)  # trained by AdamW, not lost
    with pytest.raises(ValueError, match=r"strict=True.*conv\[default\]"):
        oplora.OPLoRA(model, strict=True)


def test_find_sites_covers_frozen_adapters_and_flags_half_frozen_ones():
    model = lora_net()
    model.fc1.lora_A.weight.requires_grad_(False)
    model.fc1.lora_B.weight.requires_grad_(False)
    sites, unsupported = find_lora_sites(model)
    assert [(s.name, s.trainable) for s in sites] == [("fc1", False), ("fc2", True)] and not unsupported
    model.fc2.lora_A.weight.requires_grad_(False)
    sites, unsupported = find_lora_sites(model)
    assert [s.name for s in sites] == ["fc1"] and unsupported[0].name == "fc2"
    assert "only one" in unsupported[0].reason and len(unsupported[0].params) == 2


def test_nonfinite_capture_raises_naming_the_layer_and_moves_nothing():
    model = lora_net()
    model.fc2.base_layer.bias.requires_grad_(True)
    opt = oplora.OPLoRA(model, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 12, dtype=torch.float64)
    x[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(x).sum().backward()
    with pytest.raises(FloatingPointError, match="'fc1'"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.state


def test_capture_holds_the_tensors_autograd_holds_without_copies():
    layer = oplora.LoRALinear(nn.Linear(12, 6, dtype=torch.float64), r=2)
    opt = oplora.OPLoRA(layer, capture="rows")
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    layer(x).sum().backward()
    (cx, _, _), = opt._sites[0].chunks
    assert cx.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view, not a copy
    assert not cx.requires_grad and cx.grad_fn is None  # no graph kept alive


def test_dora_adapters_are_not_captured_as_plain_lora():
    cfg = peft.LoraConfig(target_modules=["fc1", "fc2"], r=2, lora_alpha=2, use_dora=True)
    model = peft.get_peft_model(Net(), cfg)
    with pytest.raises(ValueError, match=r"fc1\[default\]: a LoRA variant"):
        oplora.OPLoRA(model, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one message, no warning before it
        with pytest.raises(ValueError, match=r"every LoRA layer of the model is of a kind it cannot train.*DoRA"
                                             r".*torch optimizer"):
            oplora.OPLoRA(model)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_captures_each_call_once(reentrant):
    model = lora_net()
    opt = oplora.OPLoRA(model, capture="rows")
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant).square().sum().backward()
    assert all(len(site.chunks) == 1 for site in opt._sites)
    assert check_gradient_identity(opt) == 2


def test_print_shows_what_the_optimizer_trains():
    """``print(opt)``: layers trained and left to the other optimizer (with why), the other
    parameters, capture bytes, backend -- not torch's dump of hundreds of tensors."""
    model = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["fc2"], r=2, lora_alpha=2))
    model.add_adapter("dora", peft.LoraConfig(target_modules=["fc1"], r=2, lora_alpha=2, use_dora=True))
    model.base_model.set_adapter(["default", "dora"])
    with pytest.warns(UserWarning, match="cannot be captured"):
        opt = oplora.OPLoRA(model, lr=0.1, seed=5, capture="rows")
    text = repr(opt)
    assert text.startswith("OPLoRA: 1 LoRA layers (r=2)")
    assert "hyper-parameters: lr=0.1, momentum=0.9" in text and "seed=5" in text
    assert "LoRA layers: 1 linear: fc2" in text
    assert re.search(r"left to AdamW \(not captured\): .*fc1\[dora\]: a LoRA variant", text)
    assert re.search(r"other parameters: \d+ tensors, [\d,]+ numbers, by AdamW \(lr=0.001", text)
    assert "holding 0 B now; steps taken: 0" in text and "backend: cpu -> " in text
    assert "Parameter Group" not in text
    model(torch.randn(4, 12, dtype=torch.float64)).sum().backward()
    assert "holding 0 B now" not in repr(opt)
    opt.step()
    assert "steps taken: 1" in repr(opt)
