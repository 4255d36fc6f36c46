"""``load_state_dict`` validates what it loads (SPEC section 3): a checkpoint with a state entry of
the wrong shape, NaN or negative K-FAC statistics, a missing entry, another optimizer's groups or a
bad moment buffer of another parameter is refused with a ``ValueError`` naming the layer (or
parameter) and the key, and the optimizer stays as it was; float32 master factors survive a
round trip."""

import copy
import io

import pytest
import torch

import oplora

from training_cases import batch, loss_fn, make_model

OPTIMIZERS = {
    "oplora": lambda m, **kw: oplora.OPLoRA(m, lr=0.05, momentum=0.9, seed=0, **kw),
    "scaled": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, **kw),
    "scaled_dense": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, metric="dense", **kw),
    "svd": lambda m, **kw: oplora.SVDLoRA(m, lr=0.05, momentum=0.5, **kw),
    "riemannian": lambda m, **kw: oplora.RiemannianLoRA(m, lr=0.05, base_kwargs={"momentum": 0.9}, **kw),
}


def trained(name, steps=2, **kw):
    model = make_model()
    opt = OPTIMIZERS[name](model, **kw)
    for seed in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch(seed)).backward()
        opt.step()
    return model, opt


def saved(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same_state(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


B0, A0, BIAS = 1, 0, 4  # state indices: layer '0' B and A, the other parameter (2.base_layer.bias)


def edit(key, value):
    return lambda sd: sd["state"][B0].__setitem__(key, value(sd["state"][B0][key]))


BAD = [
    ("oplora", edit("momentum_U", lambda t: torch.zeros(3, 3)), r"LoRA layer '0', state 'momentum_U': shape \(3, 3\), "
                                                                 r"expected \(16, 3\)"),
    ("oplora", edit("momentum_V", lambda t: t.double().T.contiguous()), r"'momentum_V': shape \(10, 3\)"),
    ("oplora", lambda sd: sd["state"][B0].pop("momentum_V"), r"LoRA layer '0', state 'momentum_V': missing"),
    ("oplora", lambda sd: sd["state"][B0].pop("step"), r"state 'step': missing"),
    ("oplora", edit("step", lambda s: -1), r"state 'step': -1 is not a non-negative integer"),
    ("oplora", edit("momentum_U", lambda t: t.int()), r"'momentum_U': expected a floating-point tensor"),
    ("scaled", edit("d_in", lambda t: t.clone().index_fill_(0, torch.tensor([2]), float("nan"))),
     r"LoRA layer '0', state 'd_in': holds NaN or Inf"),
    ("scaled", edit("d_out", lambda t: -t), r"LoRA layer '0', state 'd_out': negative K-FAC statistics"),
    ("scaled", lambda sd: sd["state"][B0].pop("d_out"), r"state 'd_out': missing"),
    ("scaled_dense", edit("d_in", lambda t: t + torch.triu(torch.ones_like(t), 1)),
     r"'d_in': a dense K-FAC statistic that is not symmetric"),
    ("svd", edit("momentum_buffer", lambda t: t[:, :4]), r"'momentum_buffer': shape \(16, 4\), expected \(16, 10\)"),
    ("oplora", lambda sd: sd["state"][BIAS].__setitem__("exp_avg", torch.zeros(7)),
     r"parameter '2.base_layer.bias', state 'exp_avg': shape \(7,\), expected \(4,\)"),
    ("riemannian", lambda sd: sd["state"][B0].__setitem__("momentum_buffer", torch.zeros(3, 16)),
     r"parameter '0.lora_B.weight', state 'momentum_buffer': shape \(3, 16\), expected \(16, 3\)"),
    ("scaled", lambda sd: sd["param_groups"][0].pop("betas"), r"lacks the hyper-parameters \['betas'\].*ScaledOPLoRA"),
]


@pytest.mark.parametrize("name, corrupt, match", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_a_bad_checkpoint_is_refused_at_load_naming_the_layer_and_key(name, corrupt, match):
    _, source = trained(name)
    checkpoint = saved(source)
    corrupt(checkpoint)
    model, opt = trained(name, steps=1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(checkpoint)
    assert same_state(opt.state_dict(), before)  # the optimizer is as it was
    opt.zero_grad()
    loss_fn(model, *batch(5)).backward()
    opt.step()  # and steps on


def test_another_optimizers_checkpoint_is_refused():
    _, source = trained("oplora")
    _, opt = trained("scaled", steps=0)
    with pytest.raises(ValueError, match=r"lacks the hyper-parameters \[.*'betas'.*\]: it is not a state of "
                                         r"ScaledOPLoRA"):
        opt.load_state_dict(saved(source))
    with pytest.raises(ValueError, match="expected the dict state_dict\\(\\) returns"):
        opt.load_state_dict([])


@pytest.mark.parametrize("name", ["oplora", "svd"])
def test_a_checkpoint_saved_before_the_first_step_loads(name):
    _, source = trained(name, steps=0)
    model, opt = trained(name, steps=1)
    opt.load_state_dict(saved(source))
    assert not opt.state


def test_master_factors_survive_a_round_trip_bit_exactly():
    def build():
        model = make_model().to(torch.bfloat16)
        return model, oplora.OPLoRA(model, lr=0.05, seed=0, master_factors=True)

    batches = [tuple(t.to(torch.bfloat16) for t in batch(seed)) for seed in range(4)]

    def run(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()

    model, opt = build()
    run(model, opt, batches[:2])
    checkpoint, weights = saved(opt), copy.deepcopy(model.state_dict())
    run(model, opt, batches[2:])
    model2, opt2 = build()
    model2.load_state_dict(weights)
    opt2.load_state_dict(checkpoint)
    state = opt2.state[model2[0].lora_B.weight]
    assert state["master_B"].dtype == state["momentum_U"].dtype == torch.float32
    run(model2, opt2, batches[2:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    bad = saved(opt)
    bad["state"][B0]["master_A"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"'master_A': shape \(3, 3\), expected \(3, 10\)"):
        opt2.load_state_dict(bad)
