"""Models with LoRA on every layer kind (PEFT Linear, Conv1d/2d/3d with every padding mode and
dilation, Embedding with ``embed_scale``, a model mixing them), their batches and losses, and two
oracles from autograd alone: the factor gradients from what a layer captured
(:func:`check_gradient_identity`) and the full gradient ``G`` (:func:`explicit_gradients`, from a
copy whose adapters are ``(I, B A)``)."""

import copy

import pytest
import torch
from torch import nn

from oplora.capture.sites import find_lora_sites

peft = pytest.importorskip("peft")
try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (the test extra pins "
                                                   "bitsandbytes==0.50.0, which quantizes on the CPU)")

F64 = torch.float64


# -- models ------------------------------------------------------------------------------------

def lora(module, targets, r=2, alpha=4, **patch):
    """``module`` with PEFT LoRA on ``targets`` (B random, not zero); ``patch`` sets attributes of
    every lora_A convolution (PEFT builds lora_A without the base layer's dilation and padding mode:
    a LoRA branch with them is set up by hand)."""
    cfg = peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, init_lora_weights=False)
    model = peft.get_peft_model(module, cfg)
    for site in find_lora_sites(model)[0]:
        for key, value in patch.items():
            setattr(site.lora_A, key, value)
    return model


CONVS = {
    # name: (base convolution, input shape, lora_A attributes to match the base layer)
    "1d-stride": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1, dtype=F64), (4, 3, 11), {}),
    "1d-dilated-circular": (lambda: nn.Conv1d(3, 4, 3, padding=2, dilation=2, padding_mode="circular", dtype=F64),
                            (3, 3, 9), {"dilation": (2,), "padding_mode": "circular"}),
    "2d": (lambda: nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dtype=F64), (3, 2, 7, 6), {}),
    "2d-same-dilated-reflect": (lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2, padding_mode="reflect",
                                                  dtype=F64), (2, 2, 6, 7),
                                {"dilation": (2, 2), "padding_mode": "reflect",
                                 "_reversed_padding_repeated_twice": [2, 2, 2, 2]}),
    "2d-unbatched": (lambda: nn.Conv2d(2, 3, 2, stride=(1, 2), dtype=F64), (2, 5, 6), {}),
    "3d": (lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0), dtype=F64), (2, 2, 4, 5, 3), {}),
}


def conv_model(name):
    make, shape, patch = CONVS[name]
    torch.manual_seed(0)
    model = lora(nn.Sequential(make()), ["0"], **patch)
    x = torch.randn(shape, dtype=F64)
    return model, x


class ScaledEmbedding(nn.Embedding):
    """An embedding that scales its output (Gemma's), which PEFT applies to the LoRA branch too."""

    def __init__(self, *args, scale, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = torch.tensor(scale, dtype=F64)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class EmbedNet(nn.Module):
    def __init__(self, scale=None):
        super().__init__()
        self.emb = (nn.Embedding(23, 6, dtype=F64) if scale is None
                    else ScaledEmbedding(23, 6, scale=scale, dtype=F64))
        self.fc = nn.Linear(6, 3, dtype=F64)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)))


class Mixed(nn.Module):
    """Every kind in one model: an Embedding, a Conv1d over its output, a Conv2d and a Conv3d on
    images, a Linear head over all three."""

    def __init__(self, dtype=F64):
        super().__init__()
        self.emb = nn.Embedding(19, 6, dtype=dtype)
        self.conv1 = nn.Conv1d(6, 5, 3, stride=2, padding=1, dtype=dtype)
        self.conv2 = nn.Conv2d(2, 4, (3, 2), stride=(1, 2), padding=(1, 0), dtype=dtype)
        self.conv3 = nn.Conv3d(2, 3, 2, padding=(1, 0, 1), dtype=dtype)
        self.fc = nn.Linear(12, 3, dtype=dtype)

    def forward(self, ids, img, vol):
        h = torch.tanh(self.conv1(self.emb(ids).transpose(1, 2))).mean(-1)
        i = torch.tanh(self.conv2(img)).mean((-2, -1))
        v = torch.tanh(self.conv3(vol)).mean((-3, -2, -1))
        return self.fc(torch.cat([h, i, v], 1))


def mixed_model(seed=0, dtype=F64):
    torch.manual_seed(seed)
    model = lora(Mixed(dtype), ["emb", "conv1", "conv2", "conv3", "fc"])
    model.base_model.model.fc.base_layer.bias.requires_grad_(True)  # an other parameter
    return model


def mixed_batch(seed, rows=4, dtype=F64):
    """``(ids, img, vol, y)`` of ``rows`` samples."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 19, (rows, 9), generator=gen), torch.randn(rows, 2, 6, 5, generator=gen, dtype=dtype),
            torch.randn(rows, 2, 3, 4, 3, generator=gen, dtype=dtype), torch.randn(rows, 3, generator=gen, dtype=dtype))


def mixed_loss(model, batch, total=None):
    """Half the squared error, summed, over ``total`` samples (default: this batch's)."""
    ids, img, vol, y = batch
    return 0.5 * (model(ids, img, vol) - y).square().sum() / (total or y.shape[0])


# -- oracles -----------------------------------------------------------------------------------

def captured_gradient(site):
    """``G = sum_j sD_j^T X_j`` (+ the folded part) from what ``site`` captured, X formed here."""
    m, n = site.shape
    g = torch.zeros(m, n, dtype=F64)
    for x, sd, _ in site.chunks:
        x = nn.functional.one_hot(x, n).double() if not x.is_floating_point() else x.double()
        g += sd.double().T @ x
    if site.folded is not None:
        g += site.folded.g.double()
    return g


def check_gradient_identity(opt, expected_sites):
    for site in opt._sites:
        g = captured_gradient(site)
        a, b = site.a.detach().double(), site.b.detach().double()
        torch.testing.assert_close(site.A.grad.double().reshape(a.shape), b.T @ g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(site.B.grad.double().reshape(b.shape), g @ a.T, rtol=1e-10, atol=1e-12)
    assert len(opt._sites) == expected_sites and all(site.rows for site in opt._sites)


def _set(module, name, value):
    module._parameters[name] = nn.Parameter(value)


def explicit_gradients(model, loss):
    """``{site name: G}`` (m x n, float64) by autograd on a copy of ``model`` whose adapters compute
    the same branch as ``(B', A') = (I_m, B A)``: ``grad_A' = G``. ``loss(model)`` runs a forward."""
    twin = copy.deepcopy(model)
    for site in find_lora_sites(twin)[0]:
        m, n = site.shape
        eye = torch.eye(m, dtype=site.B.dtype)
        product = (site.b @ site.a).detach()
        if site.kind == "embedding":
            _set(site.layer.lora_embedding_A, site.adapter, product)
            _set(site.layer.lora_embedding_B, site.adapter, eye)
            continue
        _set(site.lora_A, "weight", product.reshape(m, *site.A.shape[1:]))
        _set(site.lora_B, "weight", eye.reshape(m, m, *site.B.shape[2:]))
    for p in twin.parameters():
        p.grad = None
    loss(twin).backward()
    return {site.name: site.A.grad.double().reshape(site.shape) for site in find_lora_sites(twin)[0]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))
