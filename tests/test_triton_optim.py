"""Whole optimizers on the Triton ops agree with the torch backend: OPLoRA (several iters, the
Jacobi step, low-rank momentum) and ScaledOPLoRA (K-FAC statistics fused into the row pass),
several steps with gradient accumulation, float32 and bfloat16 models. On the CPU the kernels
run through the Triton interpreter; the ``cuda`` test repeats the comparison on a GPU."""

import pytest
import torch
from torch import nn

import oplora
from oplora import _backend, _triton_ops
from oplora_kernels import row_pass as rp

# Norm-wise relative difference of the trained factors, Triton vs torch backend, by model dtype.
# float32: the engine is the same, only the order of the float32 sums in the row pass differs.
# bfloat16: the factors are stored in bf16 after every step, and a sum that rounds the other way
# moves a stored entry by one bf16 ulp (2^-8 relative).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
STEPS = 3

# CPU runs need the interpreter (conftest sets it); GPU runs need the compiled kernels:
# TRITON_INTERPRET=0 python -m pytest -m cuda tests/test_triton_*.py
interpreted = pytest.mark.skipif(not rp.interpreting(), reason="CPU tensors run the kernels through the Triton "
                                 "interpreter: needs TRITON_INTERPRET=1")
compiled = pytest.mark.skipif(rp.interpreting(), reason="GPU kernels are tested compiled: run with TRITON_INTERPRET=0")

OPTIMIZERS = {
    "oplora": lambda m: oplora.OPLoRA(m, lr=0.05, momentum=0.9, prox=1e-2),
    "oplora_iters2_rank2": lambda m: oplora.OPLoRA(m, lr=0.05, momentum=0.8, momentum_rank=2, iters=2),
    "oplora_jacobi": lambda m: oplora.OPLoRA(m, lr=0.05, momentum=0.9, iters=0, prox=0.1),
    "scaled": lambda m: oplora.ScaledOPLoRA(m, lr=0.02, metric_power=0.5),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(13, 29)
        self.b = nn.Linear(29, 17)
        self.c = nn.Linear(17, 5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def train(name, ops, dtype, device, monkeypatch):
    monkeypatch.setattr(_backend, "ops_for", lambda _device: ops)
    torch.manual_seed(0)
    model = Net().to(device=device, dtype=dtype)
    oplora.add_lora(model, ["a", "b", "c"], r=3, alpha=6)
    opt = OPTIMIZERS[name](model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        opt.zero_grad()
        for micro in range(2):  # gradient accumulation: two chunks of rows per layer
            x = torch.randn(11 + 7 * micro, 13, generator=gen).to(device=device, dtype=dtype)
            y = torch.randn(11 + 7 * micro, 5, generator=gen).to(device=device, dtype=dtype)
            (model(x) - y).float().square().mean().backward()
        opt.step()
    return [p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n]


def assert_close_runs(name, dtype, device, monkeypatch):
    fast = train(name, _triton_ops.OPS, dtype, device, monkeypatch)
    slow = train(name, _backend.TORCH_OPS, dtype, device, monkeypatch)
    assert len(fast) == 6
    for a, b in zip(fast, slow):
        assert torch.isfinite(a).all()
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert err <= TOL[dtype], f"{name} {dtype}: {err:.2e}"


@interpreted
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float32_model_matches_torch_backend(name, monkeypatch):
    assert_close_runs(name, torch.float32, "cpu", monkeypatch)


@interpreted
@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_bfloat16_model_matches_torch_backend(name, monkeypatch):
    assert_close_runs(name, torch.bfloat16, "cpu", monkeypatch)


@interpreted
def test_the_factors_move(monkeypatch):
    """Not a vacuous comparison: the steps change every LoRA factor (B starts at zero)."""
    monkeypatch.setattr(_backend, "ops_for", lambda _device: _triton_ops.OPS)
    torch.manual_seed(0)
    start = Net()
    oplora.add_lora(start, ["a", "b", "c"], r=3, alpha=6)
    before = [p.detach().clone() for n, p in start.named_parameters() if "lora_" in n]
    after = train("oplora", _triton_ops.OPS, torch.float32, "cpu", monkeypatch)
    assert all(float((a - b).norm()) > 1e-3 for a, b in zip(after, before))


@pytest.mark.cuda
@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cuda_matches_torch_backend(name, dtype, monkeypatch):
    assert_close_runs(name, dtype, "cuda", monkeypatch)
