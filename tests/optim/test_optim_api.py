"""The optimizers as torch optimizers: param groups, other parameters, state_dict round trips,
LR schedulers, ``step(closure)``, hyper-parameter validation."""

import io
import math

import pytest
import torch
from torch import nn

import oplora

OPTIMIZERS = {
    "oplora": lambda m, **kw: oplora.OPLoRA(m, lr=0.05, momentum=0.9, **kw),
    "oplora_rank2": lambda m, **kw: oplora.OPLoRA(m, lr=0.05, momentum=0.8, momentum_rank=2, iters=2, **kw),
    "scaled": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, **kw),
    "scaled_dense_shampoo": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, metric="dense", statistics="shampoo",
                                                                metric_power=0.25, **kw),
    "svd": lambda m, **kw: oplora.SVDLoRA(m, lr=0.05, momentum=0.5, **kw),
    "riemannian_sgd": lambda m, **kw: oplora.RiemannianLoRA(m, lr=0.05, base_kwargs={"momentum": 0.9}, **kw),
    "riemannian_adamw": lambda m, **kw: oplora.RiemannianLoRA(m, lr=0.01, base="adamw", **kw),
}


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 24), nn.GELU(), nn.Linear(24, 24), nn.GELU())
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def make_model(seed=0):
    torch.manual_seed(seed)
    model = Classifier()
    oplora.add_lora(model, ["body.0", "body.2"], r=4, alpha=8)
    model.head.requires_grad_(True)
    model.norm.requires_grad_(True)
    return model


def data(steps, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(steps)]


def run(model, opt, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def plain(value):
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("save_at", [0, 2])
def test_state_dict_round_trip_resumes_bit_exactly(name, save_at):
    make = OPTIMIZERS[name]
    batches = data(5)
    model = make_model()
    opt = make(model, seed=123) if "oplora" in name or "scaled" in name else make(model)
    run(model, opt, batches[:save_at])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    sd = opt.state_dict()
    assert plain(sd)
    run(model, opt, batches[save_at:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed, seed=456) if "oplora" in name or "scaled" in name else make(resumed)
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, batches[save_at:])
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_groups_hold_lora_factors_then_other_parameters():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.1, other_kwargs={"lr": 0.01, "weight_decay": 0.0})
    lora, other = opt.param_groups
    assert lora["kind"] == "lora" and other["kind"] == "other"
    assert [id(p) for p in lora["params"]] == [id(p) for m in (model.body[0], model.body[2])
                                                for p in (m.lora_A.weight, m.lora_B.weight)]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in other["params"]) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert lora["lr"] == 0.1 and other["lr"] == 0.01 and other["betas"] == (0.9, 0.999)
    assert opt.lora_layers == ["body.0", "body.2"]


def test_other_parameters_follow_their_optimizer_exactly():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.1, other="sgd", other_kwargs={"lr": 0.07})
    x, y = data(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    expected = model.head.weight.detach() - 0.07 * model.head.weight.grad
    opt.step()
    torch.testing.assert_close(model.head.weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert oplora.OPLoRA(make_model(), other=torch.optim.Adagrad).param_groups[1]["lr_decay"] == 0


def test_adding_a_param_group_is_refused():
    model = make_model()
    opt = oplora.OPLoRA(model)
    with pytest.raises(RuntimeError, match="builds its param groups from the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_a_model_with_only_lora_has_one_group():
    model = make_model()
    model.requires_grad_(False)
    for m in (model.body[0], model.body[2]):
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    assert len(oplora.ScaledOPLoRA(model).param_groups) == 1
    with pytest.raises(ValueError, match="other must be"):
        oplora.ScaledOPLoRA(model, other="lion")  # checked even with nothing for it to train


def test_lr_schedulers_drive_both_groups():
    model = make_model()
    opt = oplora.ScaledOPLoRA(model, lr=0.02, other_kwargs={"lr": 0.004})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    run(model, opt, data(3), sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / 8)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.004 / 8)
    assert opt._inner["other"].param_groups[0] is opt.param_groups[1]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    run(model, opt, data(4), cosine)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["oplora", "scaled", "riemannian_sgd", "riemannian_adamw"])
@pytest.mark.parametrize("cyclic", [False, True], ids=["onecycle", "cyclic"])
def test_schedulers_that_cycle_momentum_drive_every_group(name, cyclic):
    """OneCycleLR and CyclicLR write "momentum" (OPLoRA's family) or "betas" into every group: the
    other parameters' AdamW takes the cycled value as its beta1 at the next step."""
    model = make_model()
    opt = OPTIMIZERS[name](model)
    sched = (torch.optim.lr_scheduler.CyclicLR(opt, 1e-3, 1e-2, step_size_up=2) if cyclic else
             torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8))
    key = "betas" if "betas" in opt.defaults else "momentum"
    seen = set()
    for x, y in data(5):
        cycled = opt.param_groups[0][key]
        cycled = cycled[0] if key == "betas" else cycled
        seen.add(round(cycled, 12))
        run(model, opt, [(x, y)])
        assert opt.param_groups[1]["betas"][0] == pytest.approx(cycled)
        sched.step()
    assert len(seen) > 2  # it did cycle


def test_zero_lr_moves_nothing():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.1)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    run(model, opt, data(2))
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=1e-5, atol=1e-6)


def test_scheduler_state_survives_a_resume():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(model, opt, data(2), sched)
    opt2 = oplora.OPLoRA(model, lr=0.1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt2._inner["other"].param_groups[0] is opt2.param_groups[1]


def test_step_with_closure_returns_the_loss():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.1)
    x, y = data(1)[0]
    before = model.body[0].lora_B.weight.detach().clone()  # B = 0: the first step moves B (A stays)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and math.isfinite(loss.item())
    assert not torch.equal(model.body[0].lora_B.weight, before)


def test_layer_not_reached_is_left_alone():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.1, momentum=0.9)
    x, y = data(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    b2 = model.body[2]
    frozen = [b2.lora_A.weight.detach().clone(), b2.lora_B.weight.detach().clone(),
              opt.state[b2.lora_B.weight]["momentum_U"].clone()]
    opt.zero_grad()
    # A forward that skips body.2: only body.0 (and the head) see a backward pass.
    h = model.body[1](model.body[0](x))
    nn.functional.cross_entropy(model.head(model.norm(h)), y).backward()
    opt.step()
    assert torch.equal(b2.lora_A.weight, frozen[0]) and torch.equal(b2.lora_B.weight, frozen[1])
    assert torch.equal(opt.state[b2.lora_B.weight]["momentum_U"], frozen[2])
    assert opt.state[b2.lora_B.weight]["step"] == 1 and opt.state[model.body[0].lora_B.weight]["step"] == 2


def test_memory_of_oplora_state_equals_the_lora_parameters():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.1, momentum=0.9)
    run(model, opt, data(1))
    lora = sum(p.numel() for p in opt.lora_group["params"])
    state = sum(v.numel() for p in opt.lora_group["params"] for v in opt.state[p].values()
                if isinstance(v, torch.Tensor))
    assert state == lora


BAD = [
    (oplora.OPLoRA, {"lr": -1.0}, "lr"),
    (oplora.OPLoRA, {"lr": float("nan")}, "lr"),
    (oplora.OPLoRA, {"lr": "0.1"}, "lr"),
    (oplora.OPLoRA, {"momentum": 1.0}, "momentum"),
    (oplora.OPLoRA, {"dampening": 1.5}, "dampening"),
    (oplora.OPLoRA, {"iters": -1}, "iters"),
    (oplora.OPLoRA, {"iters": 1.5}, "iters"),
    (oplora.OPLoRA, {"prox": -0.1}, "prox"),
    (oplora.OPLoRA, {"momentum_rank": 0}, "momentum_rank"),
    (oplora.OPLoRA, {"start": "C"}, "start"),
    (oplora.OPLoRA, {"other": "lion"}, "other"),
    (oplora.OPLoRA, {"other": torch.nn.Linear}, "other"),
    (oplora.OPLoRA, {"other_kwargs": {"betas": (2.0, 0.5)}}, "other_kwargs"),
    (oplora.OPLoRA, {"other_kwargs": {"not_an_arg": 1}}, "other_kwargs"),
    (oplora.OPLoRA, {"seed": -3}, "seed"),
    (oplora.ScaledOPLoRA, {"betas": (0.9,)}, "betas"),
    (oplora.ScaledOPLoRA, {"betas": (0.9, 1.0)}, r"betas\[1\]"),
    (oplora.ScaledOPLoRA, {"damping": 0.0}, "damping"),
    (oplora.ScaledOPLoRA, {"metric_power": 1.5}, "metric_power"),
    (oplora.ScaledOPLoRA, {"metric": "full"}, "metric"),
    (oplora.ScaledOPLoRA, {"statistics": "adam"}, "statistics"),
    (oplora.ScaledOPLoRA, {"loss_reduction": "none"}, "loss_reduction"),
    (oplora.ScaledOPLoRA, {"init_metric_scale": 0.0, "preset": "paper"}, "init_metric_scale must be > 0"),
    (oplora.ScaledOPLoRA, {"bias_correction": True, "init_metric_scale": 0.5}, "init_metric_scale"),
    (oplora.ScaledOPLoRA, {"bias_correction": 1}, "bias_correction"),
    (oplora.ScaledOPLoRA, {"relative_damping": "yes"}, "relative_damping"),
    (oplora.OPLoRA, {"relative_prox": None}, "relative_prox"),
    (oplora.SVDLoRA, {"momentum": -0.1}, "momentum"),
    (oplora.RiemannianLoRA, {"base": "lion"}, "base"),
    (oplora.RiemannianLoRA, {"damping": -1.0}, "damping"),
    (oplora.RiemannianLoRA, {"base_kwargs": {"momentum": -1.0}}, "base_kwargs"),
]


@pytest.mark.parametrize("cls, kwargs, match", BAD, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD])
def test_bad_hyper_parameters_are_named(cls, kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        cls(model, **kwargs)
    assert all(not m._forward_hooks for m in model.modules())


def test_other_kwargs_errors_name_the_real_problem():
    with pytest.raises(ValueError, match="momentum") as err:
        oplora.OPLoRA(make_model(), other_kwargs={"momentum": 0.9})  # AdamW has betas, not momentum
    assert "no default lr" not in str(err.value)
    with pytest.raises(ValueError, match="no default lr"):
        oplora.OPLoRA(make_model(), other=NoDefaultLr)


class NoDefaultLr(torch.optim.SGD):
    def __init__(self, params, lr, momentum=0.0):
        super().__init__(params, lr=lr, momentum=momentum)


def test_scaled_presets_fill_the_arguments_left_unset():
    group = oplora.ScaledOPLoRA(make_model()).lora_group
    assert all(group[k] == v for k, v in oplora.ScaledOPLoRA.PRESETS["default"].items())
    paper = oplora.ScaledOPLoRA(make_model(), preset="paper").lora_group
    assert (paper["damping"], paper["metric_power"], paper["bias_correction"], paper["relative_damping"],
            paper["init_metric_scale"]) == (0.1, 1.0, False, False, 1.0)
    mixed = oplora.ScaledOPLoRA(make_model(), preset="paper", metric_power=0.5, bias_correction=True).lora_group
    assert (mixed["metric_power"], mixed["bias_correction"], mixed["damping"]) == (0.5, True, 0.1)
    with pytest.raises(ValueError, match="preset must be one of 'default', 'paper'"):
        oplora.ScaledOPLoRA(make_model(), preset="papers")


def test_range_messages_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -1.0"):
        oplora.OPLoRA(make_model(), lr=-1.0)
    with pytest.raises(ValueError, match=r"damping must be > 0, got 0.0"):
        oplora.ScaledOPLoRA(make_model(), damping=0.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        oplora.OPLoRA(make_model(), momentum=1.0)


GROUP_BAD = [
    ("oplora", "iters", -1), ("oplora", "start", "C"), ("oplora", "prox", -1.0), ("oplora", "momentum", 1.5),
    ("oplora", "lr", float("nan")), ("oplora", "max_grad_norm", -1.0), ("scaled", "betas", (0.9, 1.2)),
    ("scaled", "metric_power", 2.0), ("scaled", "statistics", "adam"), ("scaled", "bias_correction", "no"),
    ("svd", "momentum", -0.5), ("riemannian_sgd", "damping", 0.0),
]


@pytest.mark.parametrize("name, key, value", GROUP_BAD, ids=[f"{n}-{k}" for n, k, _ in GROUP_BAD])
def test_hyper_parameters_written_into_param_groups_are_checked_at_the_step(name, key, value):
    """Sweep and config tools set hyper-parameters in ``param_groups``: a bad one is refused at the
    step, naming it, before anything moves (not a silent no-op step)."""
    model = make_model()
    opt = OPTIMIZERS[name](model)
    run(model, opt, data(1))
    opt.param_groups[0][key] = value
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\]"):
        run(model, opt, data(1))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bf16_factors_resume_bit_exactly_with_float32_statistics():
    def build():
        model = make_model().to(torch.bfloat16)
        return model, oplora.ScaledOPLoRA(model, lr=0.01, seed=1)

    batches = [(x.to(torch.bfloat16), y) for x, y in data(4)]
    model, opt = build()
    run(model, opt, batches[:2])
    saved_model, saved_opt = copy_state(model.state_dict()), copy_state(opt.state_dict())
    assert opt.state[model.body[0].lora_B.weight]["d_in"].dtype == torch.float32
    run(model, opt, batches[2:])
    model2, opt2 = build()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.state[model2.body[0].lora_B.weight]["d_in"].dtype == torch.float32
    run(model2, opt2, batches[2:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def copy_state(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
