"""Quickstart: LoRA fine-tuning of a plain PyTorch model with OPLoRA, in 30 lines.

A small MLP learns the handwritten digits 0-4 (scikit-learn's load_digits), then its LoRA adapters
learn the digits 5-9 with OPLoRA while the base weights stay frozen. Run: python examples/quickstart.py
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import oplora

torch.manual_seed(0)
x, y = (torch.tensor(a) for a in load_digits(return_X_y=True))
x = x.float() / 16.0
old, new = y < 5, y >= 5

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
pretrain = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(200):  # the "pretrained" base model: digits 0-4 only
    pretrain.zero_grad()
    nn.functional.cross_entropy(model(x[old]), y[old]).backward()
    pretrain.step()

oplora.add_lora(model, ["0", "2"], r=4)  # LoRA on both linear layers; the base is frozen
opt = oplora.OPLoRA(model, lr=0.3)       # lr on the scale of SGD on the full weight
for step in range(41):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[new]), y[new])
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step:2d}  loss on the new digits {loss.item():.3f}")
