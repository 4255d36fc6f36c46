"""Optimizer steps on every backend: the step engine's half-steps against ``reference.lorsum``, and
whole optimizer runs on the C++ and Triton ops against the torch ops.

The half-steps: one layer, prox 0 and > 0, metric on and off, B = 0, both starts, the Jacobi step,
float32 and float64. The runs: OPLoRA (several iters, the Jacobi step, low-rank momentum) and
ScaledOPLoRA (K-FAC statistics fused into the row pass, square-root metric, Shampoo statistics)
on two small models, several steps with gradient accumulation (two chunks of rows per layer),
float32 and bfloat16. On the CPU the Triton kernels run through the interpreter; the ``cuda``
test repeats the Triton runs on a GPU. Bounds: tests/tolerances.py.
"""

import pytest
import torch
from backend_cases import compiled, cpu_backends, use_backend
from tolerances import assert_close
from torch import nn

import oplora
from oplora import backends as _backend, reference
from oplora.optim import engine

# ------------------------------------------------------------------ half-steps vs reference.lorsum


def chunks(n, m, rows, dtype):
    return [torch.randn(t, n, dtype=dtype) for t in rows], [torch.randn(t, m, dtype=dtype) for t in rows]


def engine_lorsum(ops, u_rows, x_rows, thin, data_coeff, init, *, iters, prox, metric, start):
    """The engine on one problem whose data term is ``sum_j G_j^T X_j``."""
    problem = engine.Problem(init=init, thin=thin, data_coeff=data_coeff, data_precondition=metric is not None,
                             metric=metric, lam=prox, iters=iters, start=start)
    layer = engine.Layer(xs=x_rows, gs=u_rows, problems=[problem])
    return engine.solve([layer], ops)[0][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("iters,prox,metric,start,zero_b", [
    (1, 0.0, False, "A", False), (1, 0.1, False, "A", False), (2, 0.0, True, "A", False), (1, 0.05, True, "B", False),
    (0, 0.1, True, "A", False), (0, 0.0, False, "A", False), (1, 0.0, False, "A", True), (2, 0.1, True, "B", True),
])
@pytest.mark.parametrize("backend", cpu_backends())
def test_engine_half_steps_match_reference_lorsum(backend, dtype, iters, prox, metric, start, zero_b):
    m, n, r, rows = 41, 29, 5, [13, 8]
    b0 = torch.zeros(m, r, dtype=dtype) if zero_b else torch.randn(m, r, dtype=dtype)
    a0 = torch.randn(r, n, dtype=dtype)
    xs, gs = chunks(n, m, rows, dtype)
    um, vm = torch.randn(m, 3, dtype=dtype), torch.randn(3, n, dtype=dtype)
    met = (torch.rand(m, dtype=dtype) + 0.5, torch.rand(n, dtype=dtype) + 0.5) if metric else None
    lr = 0.3
    thin = [(b0, a0, 1.0, False), (um, vm, -lr * 0.9, metric)]
    terms = [(b0, a0)] + [(g.mT, x) for x, g in zip(xs, gs)] + [(um, vm)]
    coeffs = [1.0] + [-lr] * len(rows) + [-lr * 0.9]
    pre = [False] + [True] * (len(rows) + 1) if metric else None
    want = reference.lorsum(terms, coeffs, (b0, a0), iters=iters, prox=prox, metric=met, precondition=pre, start=start)
    want = want[0].double() @ want[1].double()
    b, a = engine_lorsum(_backend.load(backend), gs, xs, thin, -lr, (b0, a0), iters=iters, prox=prox, metric=met,
                         start=start)
    assert b.dtype == dtype and a.dtype == dtype
    assert_close(b.double() @ a.double(), want, "lorsum", dtype)


# ------------------------------------------------------------------------ whole optimizer runs

class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(13, 29)
        self.b = nn.Linear(29, 17)
        self.c = nn.Linear(17, 5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def mlp_model():
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 6))
    return model, dict(names=["0", "2"], r=4, alpha=8)


def tower_model():
    return Tower(), dict(names=["a", "b", "c"], r=3, alpha=6)


def mlp_loss(model, micro, gen, dtype, device):
    """Classification: 16 rows per micro-batch."""
    x = torch.randn(16, 24, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 6, (16,), generator=gen).to(device)
    return nn.functional.cross_entropy(model(x).float(), y)


def tower_loss(model, micro, gen, dtype, device):
    """Regression: 11 then 18 rows per micro-batch."""
    x = torch.randn(11 + 7 * micro, 13, generator=gen).to(device=device, dtype=dtype)
    y = torch.randn(11 + 7 * micro, 5, generator=gen).to(device=device, dtype=dtype)
    return (model(x) - y).float().square().mean()


MODELS = {"mlp": (mlp_model, mlp_loss), "tower": (tower_model, tower_loss)}
OPTIMIZERS = {
    "oplora": lambda m: oplora.OPLoRA(m, lr=0.05, momentum=0.9, prox=1e-2),
    "oplora_seeded": lambda m: oplora.OPLoRA(m, lr=0.05, seed=3),
    "oplora_iters2_rank2": lambda m: oplora.OPLoRA(m, lr=0.05, momentum=0.8, momentum_rank=2, iters=2),
    "oplora_jacobi": lambda m: oplora.OPLoRA(m, lr=0.05, momentum=0.9, iters=0, prox=0.1),
    "oplora_jacobi_seeded": lambda m: oplora.OPLoRA(m, lr=0.05, iters=0, momentum=0.5, seed=3),
    "scaled": lambda m: oplora.ScaledOPLoRA(m, lr=0.02, metric_power=0.5),
    "scaled_kfac": lambda m: oplora.ScaledOPLoRA(m, lr=0.01, seed=3),
    "scaled_sqrt_iters2": lambda m: oplora.ScaledOPLoRA(m, lr=0.01, metric_power=0.5, iters=2, seed=3),
    "scaled_shampoo": lambda m: oplora.ScaledOPLoRA(m, lr=0.01, statistics="shampoo", metric_power=0.25, seed=3),
    # bias-corrected statistics and momentum, relative damping and prox (a per-layer proximal
    # weight in every small solve), B side first from B = 0
    "scaled_relative": lambda m: oplora.ScaledOPLoRA(m, lr=0.01, metric_power=0.5, bias_correction=True,
                                                     relative_damping=True, damping=1e-3, relative_prox=True,
                                                     start="auto", seed=3),
    # the metric floored at the step's statistics; the momentum of preconditioned gradients
    "scaled_guarded": lambda m: oplora.ScaledOPLoRA(m, lr=0.01, current_floor=True, precondition_momentum=True,
                                                    seed=3),
}
BF16, F32 = torch.bfloat16, torch.float32
# (model, optimizer, dtype, steps)
RUNS = ([("mlp", name, F32, 12) for name in ("oplora_seeded", "oplora_jacobi_seeded", "scaled_kfac",
                                              "scaled_sqrt_iters2", "scaled_shampoo")]
        + [("mlp", "scaled_kfac", BF16, 5)]
        + [("tower", name, dtype, 3) for dtype in (F32, BF16)
           for name in ("oplora", "oplora_iters2_rank2", "oplora_jacobi", "scaled", "scaled_relative",
                        "scaled_guarded")])
TOWER_RUNS = [run for run in RUNS if run[0] == "tower"]


def run_id(run):
    return "-".join(str(v).replace("torch.", "") for v in run)


def backend_runs():
    """Every run on the C++ ops; on the Triton ops (the interpreter is slow) the tower runs."""
    return [pytest.param(param.values[0], *run, marks=param.marks, id=f"{param.id}-{run_id(run)}")
            for param in cpu_backends("cpp", "triton") for run in RUNS
            if param.values[0] != "triton" or run[0] == "tower"]


def train(backend, model_name, opt_name, dtype, steps, monkeypatch, device="cpu"):
    """The parameters after ``steps`` steps (two micro-batches each) on ``backend``."""
    build, loss_fn = MODELS[model_name]
    with monkeypatch.context() as patch:
        use_backend(backend, device, patch)
        torch.manual_seed(0)
        model, lora = build()
        model = model.to(device=device, dtype=dtype)
        oplora.add_lora(model, lora["names"], r=lora["r"], alpha=lora["alpha"])
        opt = OPTIMIZERS[opt_name](model)
        gen = torch.Generator().manual_seed(1)
        for _ in range(steps):
            opt.zero_grad()
            for micro in range(2):
                loss_fn(model, micro, gen, dtype, device).backward()
            opt.step()
        assert _backend.ops_for(torch.device(device)).name == backend
    return {name: p.detach().clone() for name, p in model.named_parameters()}, len(lora["names"])


def assert_close_runs(backend, model_name, opt_name, dtype, steps, monkeypatch, device="cpu"):
    fast, layers = train(backend, model_name, opt_name, dtype, steps, monkeypatch, device)
    slow, _ = train("torch", model_name, opt_name, dtype, steps, monkeypatch, device)
    assert len([name for name in fast if "lora_" in name]) == 2 * layers
    for name, a in fast.items():
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close(a.float(), slow[name].float(), "step", dtype, device=device,
                     what=f"{model_name} {opt_name} {name}")


@pytest.mark.parametrize("backend,model_name,opt_name,dtype,steps", backend_runs())
def test_optimizer_runs_match_the_torch_ops(backend, model_name, opt_name, dtype, steps, monkeypatch):
    assert_close_runs(backend, model_name, opt_name, dtype, steps, monkeypatch)


@pytest.mark.parametrize("backend", cpu_backends("cpp", "triton"))
def test_the_factors_move(backend, monkeypatch):
    """Not a vacuous comparison: the steps change every LoRA factor (B starts at zero)."""
    torch.manual_seed(0)
    start = Tower()
    oplora.add_lora(start, ["a", "b", "c"], r=3, alpha=6)
    before = {n: p.detach().clone() for n, p in start.named_parameters() if "lora_" in n}
    after, _ = train(backend, "tower", "oplora", F32, 3, monkeypatch)
    assert len(before) == 6
    assert all(float((after[n] - b).norm()) > 1e-3 for n, b in before.items())


@pytest.mark.cuda
@compiled
@pytest.mark.parametrize("model_name,opt_name,dtype,steps", TOWER_RUNS, ids=[run_id(run) for run in TOWER_RUNS])
def test_cuda_triton_runs_match_the_torch_ops(model_name, opt_name, dtype, steps, monkeypatch):
    assert_close_runs("triton", model_name, opt_name, dtype, steps, monkeypatch, device="cuda")
