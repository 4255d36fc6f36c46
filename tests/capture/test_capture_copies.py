"""Copies of a captured model (SPEC section 3): ``copy.deepcopy`` (a best-so-far snapshot, an EMA, an
evaluation copy) runs as a plain module -- in training or evaluation, with or without grad, even
between the original's forward and backward -- and neither feeds nor disturbs the original's
optimizer; it can get an optimizer of its own. A model pickles (``torch.save``, multiprocessing's
spawn) while its optimizer is alive, and loads as a plain module; a model copied or pickled
together with its optimizer comes back with an optimizer that trains the copy as the original
trains the original. ``nn.DataParallel`` replicas (shallow copies that
share the original's hooks) are refused. A LoRA layer whose factors receive gradients while its
capture hooks saw nothing is refused at the step, naming it, never skipped."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import oplora

from layer_cases import mixed_batch, mixed_loss, mixed_model


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, params):
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def quiet(opt):
    return all(not site.rows and not site.passes and not site.reached and not site._pending for site in opt._sites)


@pytest.mark.parametrize("mode", ["rows", "auto"])
def test_a_deep_copy_runs_as_a_plain_module_and_leaves_the_original_alone(mode):
    model, reference = mixed_model(), mixed_model()
    opt = oplora.OPLoRA(model, lr=0.05, seed=0, capture=mode)
    ref_opt = oplora.OPLoRA(reference, lr=0.05, seed=0, capture=mode)
    twin = copy.deepcopy(model)
    start = snapshot(twin)
    for step in range(2):
        batch = mixed_batch(step)
        for o in (opt, ref_opt):
            o.zero_grad()
        loss = mixed_loss(model, batch)  # the original's X is pending ...
        mixed_loss(twin, mixed_batch(50 + step)).backward()  # ... while the copy trains
        twin.eval()
        with torch.no_grad():
            mixed_loss(twin, batch)
        twin.train()
        loss.backward()
        mixed_loss(reference, batch).backward()
        opt.step()
        ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert same(twin, start) and any(p.grad is not None for p in twin.parameters())  # never stepped
    assert quiet(opt)


def test_a_copy_made_before_steps_trains_with_its_own_optimizer():
    model = mixed_model()
    opt = oplora.OPLoRA(model, lr=0.05, seed=0)
    twin = copy.deepcopy(model)
    twin_opt = oplora.OPLoRA(twin, lr=0.05, seed=0)
    for step in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            mixed_loss(m, mixed_batch(step)).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), mixed_model().parameters()))


def test_a_model_pickles_while_its_optimizer_is_alive_and_loads_as_a_plain_module():
    model = mixed_model()
    opt = oplora.OPLoRA(model, lr=0.05, seed=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # and pickle, which multiprocessing's spawn uses
    buffer.seek(0)
    for loaded in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        start = snapshot(loaded)
        mixed_loss(loaded, mixed_batch(0)).backward()
        assert same(loaded, start) and all(torch.equal(p, q) for p, q in zip(loaded.parameters(), model.parameters()))
    assert quiet(opt)
    opt.zero_grad()
    mixed_loss(model, mixed_batch(0)).backward()
    opt.step()  # the original still trains
    assert not same(model, start)


def train_pair(pairs, steps):
    for step in range(steps):
        for m, o in pairs:
            o.zero_grad()
            mixed_loss(m, mixed_batch(step)).backward()
            o.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "deepcopy_optimizer_alone"])
@pytest.mark.parametrize("make", [
    lambda m: oplora.OPLoRA(m, lr=0.05, seed=0),
    lambda m: oplora.ScaledOPLoRA(m, lr=0.01, bias_correction=True, relative_damping=True, seed=0),
    lambda m: oplora.RiemannianLoRA(m, lr=0.01, base="adamw"),
], ids=["oplora", "scaled", "riemannian"])
def test_a_model_copied_with_its_optimizer_trains_as_the_original(how, make):
    model = mixed_model()
    opt = make(model)
    opt.lora_group["lr"] *= 0.5  # as a scheduler would: the copy keeps it
    train_pair([(model, opt)], 2)
    if how == "deepcopy":
        copied = copy.deepcopy({"model": model, "opt": opt})
        twin, twin_opt = copied["model"], copied["opt"]
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps({"opt": opt, "model": model}))
        twin, twin_opt = copied["model"], copied["opt"]
    else:
        twin_opt = copy.deepcopy(opt)
        twin = twin_opt._model()
    assert type(twin_opt) is type(opt) and twin is not model and twin_opt.lora_layers == opt.lora_layers
    assert twin_opt.lora_group["lr"] == opt.lora_group["lr"]
    assert {id(p) for g in twin_opt.param_groups for p in g["params"]} == {id(p) for p in twin.parameters()
                                                                           if p.requires_grad}
    train_pair([(model, opt), (twin, twin_opt)], 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert quiet(opt) and quiet(twin_opt)


def replicate(model):
    """The module replicas ``torch.nn.parallel.replicate`` makes (shallow copies sharing the hook
    dicts, ``_is_replica``), on the CPU: the parameters themselves instead of broadcast copies."""
    replicas = {m: m._replicate_for_data_parallel() for m in model.modules()}
    for module, replica in replicas.items():
        replica._parameters = dict(module._parameters)
        for key, child in module._modules.items():
            replica._modules[key] = None if child is None else replicas[child]
    return replicas[model]


def test_data_parallel_replicas_are_refused():
    model = mixed_model()
    opt = oplora.OPLoRA(model, lr=0.05)
    with pytest.raises(RuntimeError, match="nn.DataParallel replica.*DistributedDataParallel"):
        mixed_loss(replicate(model), mixed_batch(0))
    wrapped = nn.DataParallel(model)  # without GPUs it runs the module itself: captured as usual
    mixed_loss(wrapped, mixed_batch(0)).backward()
    assert all(site.rows for site in opt._sites)


class Bypassing(nn.Module):
    """A LoRA layer whose forward uses the factors' weights directly (as a fused LoRA kernel or a
    merged forward would): the capture hooks on lora_A and lora_B never run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        lin = self.inner
        return lin.base_layer(x) + nn.functional.linear(x, lin.lora_B.weight @ lin.lora_A.weight) * lin.scaling


def test_factors_with_gradients_and_nothing_captured_are_refused_at_the_step():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    oplora.add_lora(model, ["0", "2"], r=2)
    model[2] = Bypassing(model[2])
    opt = oplora.OPLoRA(model, lr=0.1)
    before = snapshot(model)
    model(torch.randn(5, 6)).square().sum().backward()
    with pytest.raises(RuntimeError, match=r"LoRA layer\(s\) '2.inner' received gradients.*nothing was captured"):
        opt.step()
    assert same(model, before)
    opt.zero_grad()
    model[0](torch.randn(5, 6)).square().sum().backward()  # only the captured layer: fine
    opt.step()
    assert not same(model, before)


def test_a_second_optimizer_on_the_same_layers_takes_them_over():
    """A re-run notebook cell: the earlier optimizer is closed with a warning (its step raises), the
    layers are captured once, and the new optimizer steps as if it were the only one."""
    model, reference = mixed_model(), mixed_model()
    first = oplora.OPLoRA(model, lr=0.05, seed=0)
    with pytest.warns(RuntimeWarning, match="earlier OPLoRA .* closed"):
        second = oplora.ScaledOPLoRA(model, lr=0.01, seed=0)
    ref_opt = oplora.ScaledOPLoRA(reference, lr=0.01, seed=0)
    train_pair([(model, second), (reference, ref_opt)], 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    mixed_loss(model, mixed_batch(5)).backward()
    assert first.capture_bytes() == 0 and second.capture_bytes() > 0
    with pytest.raises(RuntimeError, match="closed .*newer ScaledOPLoRA"):
        first.step()


def test_a_closed_optimizer_refuses_to_step():
    model = mixed_model()
    opt = oplora.OPLoRA(model, lr=0.05, seed=0)
    opt.close()
    mixed_loss(model, mixed_batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"closed \(close\(\) was called\)"):
        opt.step()
