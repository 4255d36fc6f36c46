"""The step engine stacks same-shaped layers into groups (``oplora.optim.engine``): a grouped step
equals the layer-by-layer step on every backend, and with the Triton backend a model-wide step
issues the same number of tensor ops and kernel launches whatever the number of layers.

The model mixes what a group must tolerate: several same-shaped layers with different data, a
layer of another shape, and a same-shaped layer that sees only half the rows (its K-FAC scale
differs from its group's others). Steps use gradient accumulation (two chunks per layer)."""

import pytest
import torch
from torch import nn

import oplora
from oplora import backends as _backend
from oplora.bench._common import count_ops
from oplora.optim import engine

STEPS = 3
WIDTH = 12

OPTIMIZERS = {
    "oplora": lambda m, **kw: oplora.OPLoRA(m, **kw, lr=0.05, momentum=0.9, prox=1e-2),
    "oplora_jacobi_rank2": lambda m, **kw: oplora.OPLoRA(m, **kw, lr=0.05, momentum=0.8, momentum_rank=2, iters=0),
    "oplora_iters2_start_b": lambda m, **kw: oplora.OPLoRA(m, **kw, lr=0.05, momentum=0.0, iters=2, start="B"),
    "scaled": lambda m, **kw: oplora.ScaledOPLoRA(m, **kw, lr=0.02, metric_power=0.5),
    "scaled_sum_power0": lambda m, **kw: oplora.ScaledOPLoRA(m, **kw, lr=0.02, metric_power=0.0, loss_reduction="sum"),
    "scaled_dense": lambda m, **kw: oplora.ScaledOPLoRA(m, **kw, lr=0.02, metric="dense"),
}


class Tower(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(blocks))
        self.side = nn.Linear(WIDTH, WIDTH)  # same shape, half the rows
        self.head = nn.Linear(WIDTH, 5)  # another shape

    def forward(self, x):
        h = x
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h), self.side(x[: x.shape[0] // 2])


def build(blocks, dtype, seed=0):
    torch.manual_seed(seed)
    model = Tower(blocks).to(dtype)
    names = [f"blocks.{i}" for i in range(blocks)] + ["side", "head"]
    oplora.add_lora(model, names, r=3, alpha=6)
    # Non-zero B, so that every layer's step differs from its neighbours' from the first step.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0.0, 0.1)
    return model


def micro_batches(steps, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(10 + 4 * k, WIDTH, generator=gen).to(dtype), torch.randn(10 + 4 * k, 5, generator=gen)
              .to(dtype)) for k in range(2)] for _ in range(steps)]


def train(name, ops, dtype, monkeypatch, blocks=3, on_step=None, capture="rows"):
    monkeypatch.setattr(_backend, "ops_for", lambda _device: ops)
    model = build(blocks, dtype)
    opt = OPTIMIZERS[name](model, capture=capture)
    for step, batch in enumerate(micro_batches(STEPS, dtype)):
        opt.zero_grad()
        for x, y in batch:
            out, side = model(x)
            ((out - y).float().square().mean() + side.float().square().mean()).backward()
        if on_step is not None and step == STEPS - 1:
            on_step(opt)
        else:
            opt.step()
    return model, opt


def lora_factors(model):
    return [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n]


def backends():
    return [(name, _backend.load(name)) for name in ("torch", "cpp") if _backend.load(name) is not None]


@pytest.mark.parametrize("capture", ["rows", "dense"])
@pytest.mark.parametrize("backend", [name for name, _ in backends()])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grouped_step_equals_the_layer_by_layer_step(name, backend, capture, monkeypatch):
    ops = dict(backends())[backend]
    grouped, _ = train(name, ops, torch.float64, monkeypatch, capture=capture)
    with monkeypatch.context() as patch:  # every layer its own signature: groups of one
        patch.setattr(engine, "_signature", lambda layer, dtype: id(layer))
        single, _ = train(name, ops, torch.float64, patch, capture=capture)
    before = lora_factors(build(3, torch.float64))
    for g, s, b in zip(lora_factors(grouped), lora_factors(single), before):
        assert float((g - s).norm()) <= 1e-11 * float(s.norm()), name
        assert float((s - b).norm()) > 1e-5  # the steps moved every factor: not a vacuous comparison


def test_groups_follow_the_signature():
    """Same shapes and hyper-parameters share a group; another shape, another coefficient or a
    different metric kind starts a new one."""
    def layer(m, n, coeff=1.0, metric=None):
        b, a = torch.randn(m, 2, dtype=torch.float64), torch.randn(2, n, dtype=torch.float64)
        rows = (torch.randn(4, n, dtype=torch.float64), torch.randn(4, m, dtype=torch.float64))
        problem = engine.Problem(init=(b, a), thin=[(b, a, 1.0, False)], data_coeff=coeff, metric=metric)
        return engine.Layer(xs=[rows[0]], gs=[rows[1]], problems=[problem])

    diag = (torch.ones(6, dtype=torch.float64), None)
    layers = [layer(6, 5), layer(6, 5), layer(7, 5), layer(6, 5, coeff=2.0), layer(6, 5, metric=diag), layer(6, 5)]
    groups, where = engine._groups(layers, _backend.load("torch"))
    assert [len(g.layers) for g in groups] == [3, 1, 1, 1]
    assert where == [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (0, 2)]


def test_state_tensors_are_updated_in_place_and_own_their_memory(monkeypatch):
    """Solutions come back as views of a group's stacks; the optimizer's state must not: each
    state tensor keeps its identity across steps (written in place) and its own storage."""
    seen = {}

    def check(opt):
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    seen[(id(state), key)] = value
        opt.step()
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    assert value.untyped_storage().nbytes() == value.nbytes, key
                    assert seen[(id(state), key)] is value, key

    train("scaled", _backend.load("torch"), torch.float32, monkeypatch, on_step=check)
    assert seen


@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_triton_step_costs_the_same_launches_for_any_number_of_layers(name, monkeypatch):
    """SPEC section 4's second lever: a model-wide step is a fixed number of launches per group
    of same-shaped layers -- not a few per layer. Counted on the third step (steady state: no
    momentum or statistics created) through the Triton interpreter."""
    from oplora.backends import triton_ops as _triton_ops
    from oplora_kernels import row_pass as rp

    if not rp.interpreting():
        pytest.skip("CPU tensors run the kernels through the Triton interpreter: needs TRITON_INTERPRET=1")
    counts = {}
    for blocks in (2, 7):
        def measure(opt):
            counts[blocks] = count_ops(opt.step)

        train(name, _triton_ops.OPS, torch.float32, monkeypatch, blocks=blocks, on_step=measure)
    assert counts[2] == counts[7], counts
    passes = 2 if name == "oplora" else 3
    # Per pass, one grouped row-pass launch for all 12-wide layers and one for the head, whose
    # 5-column rows are not 16-byte aligned (a compile-time key of the kernel).
    assert counts[2]["triton_launches"] == 2 * passes
