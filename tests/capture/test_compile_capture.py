"""torch.compile (SPEC section 3): a compiled model -- default inductor backend, fullgraph=False,
static or dynamic shapes, with activation checkpointing, every layer kind -- trains exactly as in
eager mode with every optimizer. The capture hooks run eagerly between the compiled graphs
(``torch.compiler.disable``); code compiled before the optimizer installed them never calls them,
which the first step refuses naming the layers, and ``torch._dynamo.reset()`` cures;
``fullgraph=True`` cannot include the hooks and is refused by dynamo with the reason.

Compiles take seconds on two cores: the models are small and the cases few. Each test starts from
``torch._dynamo.reset()`` (no cached code, no recompile limit reached) and checks that dynamo did
compile graphs, so that an eager fallback cannot pass for the compiled run.
"""

import pytest
import torch
from torch import nn

import oplora

from layer_cases import Net, mixed_batch, mixed_loss, mixed_model

dynamo = pytest.importorskip("torch._dynamo")
F32 = torch.float32

OPTIMIZERS = {
    "oplora": lambda m: oplora.OPLoRA(m, lr=0.1, momentum=0.9, seed=0),
    "scaled": lambda m: oplora.ScaledOPLoRA(m, lr=0.02, seed=0),
    "svd": lambda m: oplora.SVDLoRA(m, lr=0.1, momentum=0.5),
    "riemannian": lambda m: oplora.RiemannianLoRA(m, lr=0.1, base="adamw"),
}


class Checkpointed(nn.Module):
    """A frozen input layer, then ``inner`` under activation checkpointing. Dynamo cannot trace a
    checkpointed region through the capture hooks (side effects inside the checkpoint) and runs it
    eagerly -- the same steps, without the compile speed-up there --, while the rest compiles."""

    def __init__(self, inner):
        super().__init__()
        self.pre = nn.Linear(12, 12).requires_grad_(False)
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, torch.tanh(self.pre(x)), use_reentrant=False)


def mlp(checkpointed=False):
    torch.manual_seed(0)
    model = Net()
    oplora.add_lora(model, ["fc1", "fc2"], r=3, alpha=6)
    for layer in (model.fc1, model.fc2):
        nn.init.normal_(layer.lora_B.weight, std=0.3)
    model.fc2.base_layer.bias.requires_grad_(True)
    return Checkpointed(model) if checkpointed else model


def train(model, name, run, steps=3, sizes=(10, 10, 10)):
    """``steps`` steps of ``name`` on ``model``, whose forward is ``run`` (the model or its compiled
    form); the parameters after them."""
    opt = OPTIMIZERS[name](model)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        x, y = torch.randn(sizes[step], 12, generator=gen), torch.randn(sizes[step], 5, generator=gen)
        (run(x) - y).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def compiled_graphs() -> int:
    return int(dynamo.utils.counters["stats"]["unique_graphs"])


def assert_same(got, want, rtol=1e-5):
    assert len(got) == len(want)
    for p, q in zip(got, want):
        assert float((p - q).norm()) <= rtol * max(float(q.norm()), 1e-30)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_models_train_as_eager_with_every_optimizer(dynamic):
    sizes = (10, 13, 7) if dynamic else (10, 10, 10)
    for name in OPTIMIZERS:
        model, reference = mlp(), mlp()
        eager = train(reference, name, reference, sizes=sizes)
        compiled = train(model, name, torch.compile(model, dynamic=dynamic), sizes=sizes)
        assert_same(compiled, eager)
        assert any(not torch.equal(p, q) for p, q in zip(compiled, mlp().parameters()))
    assert compiled_graphs() > 0


def test_a_compiled_checkpointed_model_trains_as_eager():
    reference, model = mlp(checkpointed=True), mlp(checkpointed=True)
    eager = train(reference, "oplora", reference)
    compiled = train(model, "oplora", torch.compile(model))
    assert_same(compiled, eager)
    assert compiled_graphs() > 0


def test_a_compiled_model_of_every_layer_kind_trains_as_eager():
    runs = []
    for compile_it in (False, True):
        model = mixed_model(dtype=F32)
        opt = oplora.ScaledOPLoRA(model, lr=0.02, seed=0)
        run = torch.compile(model) if compile_it else model
        for step in range(2):
            opt.zero_grad()
            mixed_loss(run, mixed_batch(step, dtype=F32)).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert_same(runs[1], runs[0])
    assert compiled_graphs() > 0


def test_compiled_before_the_optimizer_is_refused_until_dynamo_is_reset():
    model = mlp()
    run = torch.compile(model)
    run(torch.randn(4, 12))  # e.g. an evaluation before training: compiled without the hooks
    opt = oplora.OPLoRA(model, lr=0.1, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    run(torch.randn(4, 12)).square().sum().backward()
    with pytest.raises(RuntimeError, match=r"'fc1', 'fc2' received gradients.*torch._dynamo.reset\(\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    dynamo.reset()
    opt.zero_grad()
    run(torch.randn(4, 12)).square().sum().backward()
    assert all(site.rows == 4 for site in opt._sites)
    opt.step()


def test_fullgraph_is_refused_naming_the_capture_hooks():
    model = mlp()
    opt = oplora.OPLoRA(model, lr=0.1)
    with pytest.raises(Exception, match="oplora capture hook.*fullgraph=False"):
        torch.compile(model, fullgraph=True)(torch.randn(4, 12))
    assert all(not site.rows for site in opt._sites)
