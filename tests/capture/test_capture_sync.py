"""No host synchronisation on the capture path between the first forward and ``step()`` (issue 28):
on a GPU each one would stall the backward pass once per LoRA layer and micro-batch.

On CPU a synchronisation costs nothing, so it is counted instead: every aten op that reads a
device value back to the host or sizes its output from device data (``.item()``, ``bool()``,
``int()``, ``float()``, ``nonzero``, ``torch.equal``, boolean-mask indexing, ``bincount``,
``unique``, ...) is seen by a ``TorchDispatchMode`` during the forward and backward passes, and
``Tensor.tolist``/``numpy`` (which read memory directly) are patched. The count with the
optimizer's capture must equal the count of the same passes with AdamW (the model's own). The C++
backend's ``numpy`` views (``oplora/backends/cpu_ops.py``: CPU tensors handed to ``oplora._cpu``,
which only ever runs CPU tensors) are not synchronisations and are not counted; a CUDA tensor takes
the device's ops, which these counts cover by the same code (``g.any(1)``).
"""

import os
import sys


import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import oplora

aten = torch.ops.aten
# The aten ops that synchronise with the device (their result, or their output's size, comes from
# device data).
SYNCING = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
           aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
           aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
           aten.repeat_interleave.Tensor, aten.allclose.default}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if func in SYNCING or boolean_index:
            self.seen.append(str(func))
        return func(*args, **kwargs)


def count_syncs(run, monkeypatch):
    """The synchronising ops ``run()`` performs (forward and backward run in this thread on CPU)."""
    with CountSyncs() as mode:
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, _name=name, **k):
                caller = sys._getframe(1).f_code.co_filename
                if not caller.endswith(os.path.join("backends", "cpu_ops.py")):
                    mode.seen.append(f"Tensor.{_name}")
                return _original(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        try:
            run()
        finally:
            monkeypatch.undo()
    return mode.seen


class Model(nn.Module):
    """An Embedding, a Conv1d and Linear layers, every one with a LoRA branch (PEFT)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = torch.tanh(self.q(h) * self.k(h) + self.v(h))
        return self.head(h)


def peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "conv", "q", "k", "v", "head"])
    model = peft.get_peft_model(Model(), config)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def batches(count=2):
    """Micro-batches with padding: masked labels (-100) leave rows without gradient."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 50, (3, 12), generator=gen)
        labels = ids.clone()
        labels[:, 8:] = -100  # padding
        out.append((ids, labels))
    return out


def accumulate(model, data):
    for ids, labels in data:
        logits = model(ids)
        nn.functional.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=-100).backward()


CONFIGS = {
    "OPLoRA rows": lambda m: oplora.OPLoRA(m, lr=1e-2, capture="rows"),
    "OPLoRA auto": lambda m: oplora.OPLoRA(m, lr=1e-2, capture="auto"),
    "OPLoRA dense": lambda m: oplora.OPLoRA(m, lr=1e-2, capture="dense"),
    "OPLoRA budget0": lambda m: oplora.OPLoRA(m, lr=1e-2, capture_budget=0, sketch_rank=4),
    "ScaledOPLoRA auto": lambda m: oplora.ScaledOPLoRA(m, lr=1e-3),
    "ScaledOPLoRA dense": lambda m: oplora.ScaledOPLoRA(m, lr=1e-3, capture="dense"),
    "ScaledOPLoRA metric=dense": lambda m: oplora.ScaledOPLoRA(m, lr=1e-3, metric="dense"),
    "ScaledOPLoRA budget0": lambda m: oplora.ScaledOPLoRA(m, lr=1e-3, capture_budget=0, sketch_rank=4),
}


def test_the_counter_sees_a_synchronisation(monkeypatch):
    """The counter is not blind: the check this package used to make in its capture hook."""
    g = torch.randn(5, 3)
    seen = count_syncs(lambda: (bool(g.ne(0).any(1).all()), g.nonzero(), g.tolist(), torch.equal(g, g)),
                       monkeypatch)
    assert len(seen) >= 4, seen


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_no_host_synchronisation_between_the_first_forward_and_the_step(config, monkeypatch):
    """Two steps of gradient accumulation over padded micro-batches (the second step's passes are
    counted: the first creates the state): the capture adds no synchronisation to the passes
    AdamW's run makes; the step then drops the padding rows (``Capture.settle``) and moves."""
    baseline_model = peft_model()
    adamw = torch.optim.AdamW([p for p in baseline_model.parameters() if p.requires_grad], lr=1e-3)
    accumulate(baseline_model, batches())
    adamw.step()
    adamw.zero_grad()
    baseline = count_syncs(lambda: accumulate(baseline_model, batches()), monkeypatch)

    model = peft_model()
    opt = CONFIGS[config](model)
    accumulate(model, batches())
    opt.step()
    opt.zero_grad()
    seen = count_syncs(lambda: accumulate(model, batches()), monkeypatch)
    assert seen == baseline, f"{config}: the capture synchronised with the device: {seen} (AdamW's run: {baseline})"
    kinds = {site.kind for site in opt._sites}
    assert kinds == {"linear", "conv", "embedding"}
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt.step()
    assert all(site.rows == 0 and not site.held for site in opt._sites)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(x, y) for x, y in zip(before, after))
    opt.close()
