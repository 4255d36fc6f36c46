"""A small model, its batches and loss, and the optimizers as most training tests build them
(float32 by default), with a snapshot of the factors and state to compare steps against."""

import torch
from torch import nn

import oplora


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 16, dtype=dtype), nn.Tanh(), nn.Linear(16, 4, dtype=dtype))
    oplora.add_lora(model, ["0", "2"], r=3, alpha=6)
    for i in (0, 2):
        nn.init.normal_(model[i].lora_B.weight, std=0.3)
    model[2].base_layer.bias.requires_grad_(True)
    return model


def batch(seed=1, rows=24, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 10, generator=gen, dtype=dtype), torch.randn(rows, 4, generator=gen, dtype=dtype)


def loss_fn(model, x, y):
    return 0.5 * (model(x) - y).square().sum(1).mean()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def same(model, opt, snap):
    params, state = snap
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), params)) and \
        {id(p): set(s) for p, s in opt.state.items()} == {k: set(v) for k, v in state.items()}


OPTIMIZERS = {
    "oplora": lambda m: oplora.OPLoRA(m, lr=0.05, momentum=0.9, seed=0),
    "scaled": lambda m: oplora.ScaledOPLoRA(m, lr=0.01, seed=0),
    "svd": lambda m: oplora.SVDLoRA(m, lr=0.05, momentum=0.5),
    "riemannian": lambda m: oplora.RiemannianLoRA(m, lr=0.05, base="adamw"),
}
