"""Every LoRA layer kind the optimizers capture (SPEC section 3, "Layer kinds"), against autograd and
the explicit float64 step (``test_layer_kinds_steps``): PEFT Conv1d/2d/3d LoRA (stride, padding of every mode, dilation, an
unbatched call), PEFT Embedding LoRA (one-hot rows never formed, ``embed_scale``), LoRA over
bitsandbytes 4-bit and 8-bit bases, and one model mixing every kind -- through every backend,
every capture mode, with clipping, K-FAC statistics, gradient accumulation and RiemannianLoRA.

Two oracles, both from autograd alone. The factor gradients: ``grad_A = B^T G`` and
``grad_B = G A^T`` with ``G`` from the captured rows (kernels flattened). The full gradient ``G``
itself: the same model with each adapter's factors replaced by ``(B', A') = (I, B A)`` -- the same
branch, ``B' A' = B A`` --, whose ``grad_A'`` is ``B'^T G = G``.
"""

import math
import warnings

import pytest
import torch
from layer_cases import (CONVS, F64, EmbedNet, captured_gradient, check_gradient_identity, conv_model,
                         explicit_gradients, lora, mixed_batch, mixed_loss, mixed_model)
from torch import nn

import oplora
import oplora.capture.holding  # noqa: F401  (capture.holding, patched below)
from oplora import capture


# -- capture against autograd -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["rows", "dense", "auto"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_capture_reproduces_autograd_factor_gradients(name, mode):
    model, x = conv_model(name)
    opt = oplora.OPLoRA(model, lr=0.1, capture=mode)
    (site,) = opt._sites
    assert site.kind == "conv" and site.a.shape == (2, site.A[0].numel()) and site.b.shape == (site.B.shape[0], 2)
    w = torch.randn(model(x).shape, dtype=F64)
    for _ in range(2):  # accumulation
        (torch.tanh(model(x)) * w).sum().backward()
    check_gradient_identity(opt, 1)
    explicit = explicit_gradients(model, lambda m: 2 * (torch.tanh(m(x)) * w).sum())
    torch.testing.assert_close(captured_gradient(site), explicit[site.name], rtol=1e-10, atol=1e-12)
    positions = math.prod(model(x).shape[-(x.dim() - 1 if name == "2d-unbatched" else x.dim() - 2):])
    assert site.rows == 2 * positions * (1 if name == "2d-unbatched" else x.shape[0])


@pytest.mark.parametrize("block", [7, 40, 500])
def test_conv_patches_are_im2col_in_blocks(block):
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), dtype=F64)
    x = torch.randn(3, 3, 8, 7, dtype=F64)
    want = nn.functional.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 2), stride=(2, 1)).transpose(1, 2)
    want = want.reshape(-1, want.shape[-1])
    blocks = list(capture.conv_patches(conv, x, block=block))
    assert [lo for lo, _, _ in blocks] == [0] + [hi for _, hi, _ in blocks[:-1]] and blocks[-1][1] == want.shape[0]
    assert len(blocks) > 1 or block == 500
    torch.testing.assert_close(torch.cat([p for _, _, p in blocks]), want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["rows", "auto"])
def test_conv_patches_are_folded_block_by_block(mode, monkeypatch):
    """Blocks of a few rows: held as several chunks ("rows"), or folded one by one ("auto", whose
    threshold the batch crosses) -- the same gradient."""
    monkeypatch.setattr(capture.holding, "PATCH_BLOCK", 30)  # where the capture reads it
    model, x = conv_model("2d")
    opt = oplora.OPLoRA(model, lr=0.1, capture=mode)
    (torch.tanh(model(x)) ** 2).sum().backward()
    (site,) = opt._sites
    if mode == "rows":
        assert len(site.chunks) > 3 and site.folded is None
    else:
        assert not site.chunks and site.folded.rows == site.rows
    check_gradient_identity(opt, 1)


@pytest.mark.parametrize("mode", ["rows", "dense"])
@pytest.mark.parametrize("scale", [None, 2.5])
def test_embedding_capture_reproduces_autograd_factor_gradients(scale, mode):
    torch.manual_seed(0)
    model = lora(EmbedNet(scale), ["emb", "fc"])
    opt = oplora.OPLoRA(model, lr=0.1, capture=mode)
    assert [site.kind for site in opt._sites] == ["embedding", "linear"]
    ids = torch.randint(0, 23, (4, 7))
    model(ids).square().sum().backward()
    model(ids[:2]).sum().backward()
    check_gradient_identity(opt, 2)
    site = opt._sites[0]
    if mode == "rows":
        assert all(x.dtype == torch.int64 and x.dim() == 1 for x, _, _ in site.chunks)  # ids, never one-hot
    assert site.rows == 28 + 14
    explicit = explicit_gradients(model, lambda m: m(ids).square().sum() + m(ids[:2]).sum())
    torch.testing.assert_close(captured_gradient(site), explicit[site.name], rtol=1e-10, atol=1e-12)


def test_mixed_model_captures_every_kind():
    model = mixed_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back to the other optimizer
        opt = oplora.OPLoRA(model, lr=0.1, capture="rows")
    assert [site.kind for site in opt._sites] == ["embedding", "conv", "conv", "conv", "linear"]
    mixed_loss(model, mixed_batch(0)).backward()
    check_gradient_identity(opt, 5)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dtype=F64)
        self.fc = nn.Linear(8, 3, dtype=F64)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0])


def test_lora_merged_into_the_base_weights_goes_to_other_with_the_layers_inside_it():
    """PEFT's MultiheadAttention LoRA merges B A into the attention weights (its out_proj, a LoRA
    layer of its own, is never called): neither can be captured; both train with AdamW."""
    torch.manual_seed(0)
    model = lora(Attention(), ["mha", "fc"])
    with pytest.warns(UserWarning, match=r"mha\[default\]: LoRA on MultiheadAttention.*"
                                         r"mha.base_layer.out_proj\[default\]: inside 'base_model.model.mha'"):
        opt = oplora.OPLoRA(model, lr=0.1)
    assert opt.lora_layers == ["base_model.model.fc[default]"]
    others = opt.param_groups[1]["params"]
    assert len(others) == 4  # the attention's and its out_proj's factors
    before = [p.detach().clone() for p in others]
    model(torch.randn(5, 2, 8, dtype=F64)).square().sum().backward()
    opt.step()  # nothing refused: no captured layer went without its capture
    assert all(not torch.equal(p, q) for p, q in zip(others, before))
