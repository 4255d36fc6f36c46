"""Every LoRA layer kind the optimizers capture (SPEC section 3, "Layer kinds"), against autograd and
the explicit float64 step: PEFT Conv1d/2d/3d LoRA (stride, padding of every mode, dilation, an
unbatched call), PEFT Embedding LoRA (one-hot rows never formed, ``embed_scale``), LoRA over
bitsandbytes 4-bit and 8-bit bases, and one model mixing every kind -- through every backend,
every capture mode, with clipping, K-FAC statistics, gradient accumulation and RiemannianLoRA.

Two oracles, both from autograd alone. The factor gradients: ``grad_A = B^T G`` and
``grad_B = G A^T`` with ``G`` from the captured rows (kernels flattened). The full gradient ``G``
itself: the same model with each adapter's factors replaced by ``(B', A') = (I, B A)`` -- the same
branch, ``B' A' = B A`` --, whose ``grad_A'`` is ``B'^T G = G``.
"""

import copy
import math
import warnings

import pytest
import torch
from backends import cpu_backends
from explicit import truncated_svd
from test_backends_step import use_backend
from tolerances import assert_close
from torch import nn

import oplora
from oplora import backends as _backend, capture
import oplora.capture.holding  # noqa: F401  (capture.holding, patched below)
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


# -- steps against the explicit float64 step ---------------------------------------------------

def projected_steps(model, batch, lr):
    """``{name: rank-r truncated SVD of B A - lr G}`` (float64), G by :func:`explicit_gradients`."""
    grads = explicit_gradients(model, lambda m: mixed_loss(m, batch))
    return {site.name: truncated_svd(site.b.detach().double() @ site.a.detach().double() - lr * grads[site.name],
                                     site.b.shape[1]) for site in find_lora_sites(model)[0]}


def assert_products(opt, want, rtol):
    for site in opt._sites:
        got = site.b.detach().double() @ site.a.detach().double()
        assert float((got - want[site.name]).norm()) <= rtol * float(want[site.name].norm()), site.name


@pytest.mark.parametrize("mode", ["rows", "dense"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_oplora_converges_to_the_explicit_projected_step(backend, mode, monkeypatch):
    """Many rounds, no proximal term, no momentum: LoRSum is the truncated SVD of B A - lr G."""
    model, batch, lr = mixed_model(), mixed_batch(1), 0.3
    want = projected_steps(model, batch, lr)
    with monkeypatch.context() as patch:
        use_backend(backend, "cpu", patch)
        opt = oplora.OPLoRA(model, lr=lr, momentum=0.0, prox=0.0, iters=40, capture=mode)
        mixed_loss(model, batch).backward()
        opt.step()
    assert_products(opt, want, 1e-9)


def test_svdlora_is_the_explicit_projected_step():
    model, batch, lr = mixed_model(), mixed_batch(2), 0.3
    want = projected_steps(model, batch, lr)
    opt = oplora.SVDLoRA(model, lr=lr)
    mixed_loss(model, batch).backward()
    opt.step()
    assert_products(opt, want, 1e-10)


OPTIMIZERS = {
    "oplora": lambda m, **kw: oplora.OPLoRA(m, lr=0.05, momentum=0.9, seed=0, **kw),
    "scaled": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, **kw),
    "scaled_dense": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, metric="dense", **kw),
    "svd": lambda m, **kw: oplora.SVDLoRA(m, lr=0.05, momentum=0.5, **kw),
}


def train_mixed(name, steps=3, micro=2, dtype=F64, **kw):
    """``steps`` steps of ``micro`` micro-batches; returns the model, the optimizer, the grad norms."""
    model = mixed_model(dtype=dtype)
    opt = OPTIMIZERS[name](model, **kw)
    norms = []
    for step in range(steps):
        opt.zero_grad()
        batches = [mixed_batch(10 * step + k, rows=3 + k, dtype=dtype) for k in range(micro)]
        total = sum(b[3].shape[0] for b in batches)
        for b in batches:
            mixed_loss(model, b, total).backward()
        opt.step()
        norms.append(opt.grad_norm())
    return model, opt, norms


def assert_same_models(got, want, rtol):
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        assert float((p - q).detach().norm()) <= rtol * max(float(q.detach().norm()), 1e-30), name


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_capture_mode_steps_alike_with_accumulation_and_clipping(name):
    rows, _, rows_norms = train_mixed(name, capture="rows", max_grad_norm=0.3)
    for mode in ("dense", "auto"):
        model, _, norms = train_mixed(name, capture=mode, max_grad_norm=0.3)
        assert_same_models(model, rows, 1e-10)
        assert norms == pytest.approx(rows_norms, rel=1e-10)
    assert all(n > 0.3 for n in rows_norms)  # the clip was active


@pytest.mark.parametrize("name", ["oplora", "scaled"])
@pytest.mark.parametrize("backend", cpu_backends("cpp", "triton"))
def test_every_kind_steps_on_every_backend_as_on_the_torch_ops(backend, name, monkeypatch):
    """Conv patches go through the backend's row pass (K-FAC statistics fused), Embedding ids
    through torch ops on every backend."""
    runs = []
    for which in (backend, "torch"):
        with monkeypatch.context() as patch:
            use_backend(which, "cpu", patch)
            runs.append(train_mixed(name, steps=2, dtype=torch.float32, capture="rows")[0])
            assert _backend.ops_for(torch.device("cpu")).name == which
    for (key, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        assert_close(p.detach(), q.detach(), "step", torch.float32, what=f"{backend} {name} {key}")


def test_accumulated_micro_batches_step_as_their_concatenation():
    split, _, _ = train_mixed("scaled", steps=2, micro=2, capture="rows")
    model = mixed_model()
    opt = OPTIMIZERS["scaled"](model, capture="rows")
    for step in range(2):
        opt.zero_grad()
        batches = [mixed_batch(10 * step + k, rows=3 + k) for k in range(2)]
        whole = tuple(torch.cat([b[i] for b in batches]) for i in range(4))
        mixed_loss(model, whole).backward()
        opt.step()
    assert_same_models(split, model, 1e-10)


def test_clipping_measures_the_explicit_gradient_norm():
    model, batch = mixed_model(), mixed_batch(3)
    grads = explicit_gradients(model, lambda m: mixed_loss(m, batch))
    opt = oplora.OPLoRA(model, lr=0.1, max_grad_norm=math.inf)
    mixed_loss(model, batch).backward()
    bias = model.base_model.model.fc.base_layer.bias.grad
    opt.step()
    want = math.sqrt(sum(float(g.square().sum()) for g in grads.values()) + float(bias.square().sum()))
    assert opt.grad_norm() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("method", ["rows", "explicit"])
def test_the_norm_of_index_rows_is_that_of_their_one_hot_rows(method):
    from oplora.optim.clipping import grad_sq_norm

    gen = torch.Generator().manual_seed(0)
    chunks = [(torch.randint(0, 11, (t,), generator=gen), torch.randn(t, 4, generator=gen, dtype=F64)) for t in (5, 9)]
    dense = [(nn.functional.one_hot(ids, 11).double(), g) for ids, g in chunks]
    want = grad_sq_norm(dense, method=method)
    assert float(grad_sq_norm(chunks, method=method, n=11, block=4)) == pytest.approx(float(want), rel=1e-12)
    assert float(want) == pytest.approx(float(sum(g.T @ x for x, g in dense).square().sum()), rel=1e-12)


def test_kfac_input_statistics_are_token_counts_and_patch_squares():
    """ScaledOPLoRA's d_in after one step from the papers' start (ones): b2 + (1 - b2) colsum(X^2) / T --
    for the Embedding the token counts, for the Conv2d the squares of its patches."""
    model, batch, b2 = mixed_model(), mixed_batch(4), 0.9
    opt = oplora.ScaledOPLoRA(model, lr=0.01, betas=(0.9, b2), capture="rows", preset="paper")
    mixed_loss(model, batch).backward()
    opt.step()
    ids, img = batch[0], batch[1]
    emb, conv2 = opt._sites[0], opt._sites[2]
    counts = torch.bincount(ids.reshape(-1), minlength=19).double()
    torch.testing.assert_close(opt.state[emb.B]["d_in"], b2 + (1 - b2) * counts / ids.numel())
    patches = nn.functional.unfold(img, (3, 2), padding=(1, 0), stride=(1, 2)).transpose(1, 2).reshape(-1, 12)
    torch.testing.assert_close(opt.state[conv2.B]["d_in"], b2 + (1 - b2) * patches.square().mean(0))


def test_riemannian_steps_the_flattened_kernels():
    """RiemannianLoRA (no capture) on Conv and Embedding factors: the preconditioned step on the
    factors as matrices, ``A - lr (B^T B + d I)^-1 grad_A``, ``B - lr grad_B (A A^T + d I)^-1``."""
    model, batch, lr, damping = mixed_model(), mixed_batch(5), 0.1, 1e-3
    opt = oplora.RiemannianLoRA(model, lr=lr, damping=damping)
    mixed_loss(model, batch).backward()
    want = {}
    for site in opt._sites:
        a, b = site.a.detach().clone(), site.b.detach().clone()
        ga, gb = site.A.grad.reshape(a.shape), site.B.grad.reshape(b.shape)
        eye = torch.eye(a.shape[0], dtype=F64)
        want[site.name] = (b - lr * gb @ torch.linalg.inv(a @ a.T + damping * eye),
                           a - lr * torch.linalg.solve(b.T @ b + damping * eye, ga))
    opt.step()
    for site in opt._sites:
        torch.testing.assert_close(site.b, want[site.name][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(site.a, want[site.name][1], rtol=1e-10, atol=1e-12)


# -- quantized bases --------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def quantized_and_plain():
    """A model whose fc1 is bitsandbytes 4-bit (NF4) and fc2 8-bit (LLM.int8), both with PEFT LoRA
    as a 4/8-bit loaded model gets it, and the same model on plain nn.Linear layers holding the
    de-quantized weights, with the same LoRA factors."""
    torch.manual_seed(0)
    net = Net()
    q4 = bnb.nn.Linear4bit(12, 16, quant_type="nf4", compute_dtype=torch.float32)
    q4.weight = bnb.nn.Params4bit(net.fc1.weight.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    q8 = bnb.nn.Linear8bitLt(16, 5, has_fp16_weights=False)
    q8.weight = bnb.nn.Int8Params(net.fc2.weight.data.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    q4.bias, q8.bias = net.fc1.bias, net.fc2.bias
    plain = copy.deepcopy(net)
    w4 = q4.weight
    plain.fc1.weight.data = bnb.functional.dequantize_4bit(w4.data, w4.quant_state)
    plain.fc2.weight.data = q8.weight.data.float() * q8.weight.SCB[:, None] / 127
    net.fc1, net.fc2 = q4, q8
    net.is_loaded_in_4bit = net.is_loaded_in_8bit = True  # as transformers sets them: PEFT's bnb wrappers
    quantized = lora(net, ["fc1", "fc2"], r=3, alpha=6)
    plain = lora(plain, ["fc1", "fc2"], r=3, alpha=6)
    plain.load_state_dict({k: v for k, v in quantized.state_dict().items() if "lora_" in k}, strict=False)
    return quantized, plain


@needs_bnb
@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_bitsandbytes_bases_step_as_their_dequantized_linear(name):
    quantized, plain = quantized_and_plain()
    layers = quantized.base_model.model
    assert type(layers.fc1).__name__ == "Linear4bit" and type(layers.fc2).__name__ == "Linear8bitLt"
    runs = []
    for model in (quantized, plain):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            opt = {"oplora": lambda: oplora.OPLoRA(model, lr=0.05, seed=0),
                   "scaled": lambda: oplora.ScaledOPLoRA(model, lr=0.01, seed=0)}[name]()
        assert not [w for w in record if "cannot be captured" in str(w.message)]
        assert [site.kind for site in opt._sites] == ["linear", "linear"]
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            x, y = torch.randn(10, 12, generator=gen), torch.randn(10, 5, generator=gen)
            (model(x) - y).square().mean().backward()
            opt.step()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    moved = [not torch.equal(p, q) for p, q in zip(runs[0].values(), quantized_and_plain()[0].parameters())]
    assert any(moved)
    for key, value in runs[0].items():
        assert float((value - runs[1][key]).norm()) <= 1e-5 * float(runs[1][key].norm()), key
