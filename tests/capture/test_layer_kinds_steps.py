"""Every LoRA layer kind (``test_layer_kinds``), continued: the optimizers' steps on Linear, Conv
and Embedding layers against the explicit float64 step, and quantized (QLoRA) bases."""

import copy
import math
import warnings

import pytest
import torch
from backend_cases import cpu_backends, use_backend
from explicit import truncated_svd
from layer_cases import (F64, Net, bnb, explicit_gradients, lora, mixed_batch, mixed_loss, mixed_model,
                         needs_bnb)
from tolerances import assert_close
from torch import nn

import oplora
from oplora import backends as _backend
from oplora.capture.sites import find_lora_sites


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
