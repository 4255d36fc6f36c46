"""What is held between backward and step (SPEC section 3, ``capture=``): the rows, or the rows
folded into the layer's dense gradient, or the cheaper of the two -- the same steps in every case;
the fold happens at the threshold; rows without gradient (padding) are dropped before the step
reads them (``Capture.settle``) and counted nowhere."""

import math

import pytest
import torch
from torch import nn

import oplora

WIDTH = 6


class Block(nn.Module):
    """q, k, v read the same input (their captured X is one tensor), o reads their sum."""

    def __init__(self, width=WIDTH, dtype=torch.float64):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width, dtype=dtype) for _ in range(3))
        self.o = nn.Linear(width, 3, dtype=dtype)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x) * self.k(x) + self.v(x)))


def make_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = Block(dtype=dtype)
    oplora.add_lora(model, ["q", "k", "v", "o"], r=2, alpha=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    model.o.base_layer.bias.requires_grad_(True)  # an other parameter, clipped together
    return model


def micro_batches(step, count=3, rows=(5, 2, 7), dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(rows[k % len(rows)], WIDTH, generator=gen, dtype=dtype),
             torch.randn(rows[k % len(rows)], 3, generator=gen, dtype=dtype)) for k in range(count)]


OPTIMIZERS = {
    "oplora": lambda m, **kw: oplora.OPLoRA(m, lr=0.05, momentum=0.9, seed=0, **kw),
    "scaled": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, **kw),
    "scaled_dense": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, metric="dense", **kw),
    "shampoo": lambda m, **kw: oplora.ScaledOPLoRA(m, lr=0.01, seed=0, statistics="shampoo", metric_power=0.25,
                                                   **kw),
    "svd": lambda m, **kw: oplora.SVDLoRA(m, lr=0.05, momentum=0.5, **kw),
}


def train(name, capture, steps=3, max_grad_norm=None, scaler=None, dtype=torch.float64, count=3):
    model = make_model(dtype=dtype)
    opt = OPTIMIZERS[name](model, capture=capture, max_grad_norm=max_grad_norm)
    norms = []
    for step in range(steps):
        opt.zero_grad()
        for x, y in micro_batches(step, count, dtype=dtype):
            loss = 0.5 * (model(x) - y).square().sum(1).mean()
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        norms.append(opt.grad_norm())
    return model, opt, norms


def assert_same(got, want, rtol):
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        assert float((p - q).norm()) <= rtol * max(float(q.norm()), 1e-30), name


@pytest.mark.parametrize("capture", ["dense", "auto"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_dense_and_auto_step_as_rows_with_accumulation_and_clipping(name, capture):
    rows_model, _, rows_norms = train(name, "rows", max_grad_norm=0.5)
    model, opt, norms = train(name, capture, max_grad_norm=0.5)
    assert_same(model, rows_model, 1e-10)
    assert norms == pytest.approx(rows_norms, rel=1e-10)
    assert all(n > 0.5 for n in rows_norms)  # the clip was active: not a vacuous comparison
    if capture == "dense":
        assert all(site.folded is None and not site.chunks for site in opt._sites)  # released by step()


@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_dense_steps_as_rows_under_grad_scaler(name):
    runs = [train(name, capture, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8), dtype=torch.float32)[0]
            for capture in ("rows", "dense")]
    assert_same(runs[1], runs[0], 1e-5)


def test_rows_fold_at_the_threshold_with_a_shared_input_counted_once():
    """A layer folds when its rows would cost more bytes than its m x n float32 gradient. q, k
    and v share one captured X (n columns): each layer counts a third of it."""
    model = make_model(dtype=torch.float32)
    opt = oplora.OPLoRA(model, lr=0.01)
    q = next(site for site in opt._sites if site.name == "q")
    dense = WIDTH * WIDTH * 4
    per_row = 4 * (WIDTH / 3 + WIDTH)  # X shared by q, k, v + q's own sD, float32
    fold_after = math.floor(dense / per_row) + 1  # the first row count whose bytes exceed the dense size
    held = 0
    for _ in range(fold_after + 2):
        x = torch.randn(1, WIDTH)
        model(x).square().sum().backward()
        held += 1
        if held < fold_after:
            assert q.folded is None and q.rows == held
        elif held == fold_after:
            assert q.folded is not None and not q.chunks and q.folded.rows == held
    assert q.rows == fold_after + 2
    opt.step()
    assert opt.capture_bytes() == 0


def test_auto_holds_at_most_min_rows_dense_and_stays_flat():
    model = make_model(dtype=torch.float32)
    opt = oplora.OPLoRA(model, lr=0.01)
    sizes = {site.name: (site.B.shape[0], site.A.shape[1]) for site in opt._sites}
    held = []
    for micro in range(1, 9):
        x = torch.randn(16, WIDTH)
        model(x).square().mean().backward()
        held.append(opt.capture_bytes())
        bound = sum(min(16 * micro * (m + n), m * n) * 4 for m, n in sizes.values())
        assert held[-1] <= bound
    assert held[2:] == [held[2]] * len(held[2:])  # every layer folded: flat in the micro-batches
    assert held[-1] == sum(4 * m * n for m, n in sizes.values())  # G of every layer, nothing else (OPLoRA)


def test_bad_capture_mode_is_refused():
    with pytest.raises(ValueError, match="capture must be one of 'auto', 'rows', 'dense'"):
        oplora.OPLoRA(make_model(), capture="sparse")


def padded_batch(real_rows, pad_rows, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(real_rows + pad_rows, WIDTH, generator=gen, dtype=torch.float64)
    y = torch.randn(real_rows + pad_rows, 3, generator=gen, dtype=torch.float64)
    mask = torch.zeros(real_rows + pad_rows, dtype=torch.float64)
    mask[:real_rows] = 1.0
    return x, y, mask


@pytest.mark.parametrize("pad", [12, 1], ids=["compacted", "left-in-place"])
@pytest.mark.parametrize("capture", ["rows", "auto"])
@pytest.mark.parametrize("name", ["oplora", "scaled", "scaled_dense"])
def test_a_padded_batch_steps_as_the_batch_without_its_padding(name, capture, pad):
    """Padding rows (masked out of the loss: their branch gradient is exactly zero) are not rows:
    the K-FAC statistics and their row count T see only the real rows -- whether the step's settle
    copies the real rows out (12 of 16 padded) or leaves one padded row of 5 in place."""
    padded, plain = make_model(), make_model()
    opt_padded = OPTIMIZERS[name](padded, capture=capture)
    opt_plain = OPTIMIZERS[name](plain, capture=capture)
    for step in range(3):
        x, y, mask = padded_batch(4, pad, seed=step)
        for model, opt, keep in ((padded, opt_padded, slice(None)), (plain, opt_plain, slice(0, 4))):
            opt.zero_grad()
            err = 0.5 * (model(x[keep]) - y[keep]).square().sum(1)
            ((err * mask[keep]).sum() / mask.sum()).backward()
            opt.step()
    assert_same(padded, plain, 1e-10)


def test_a_few_rows_without_gradient_are_left_in_place_uncopied():
    """One padded row in 5: the settle copies nothing (q, k, v keep the X they captured), counts 4
    rows, and takes the padded row's squares off ScaledOPLoRA's statistics."""
    model = make_model()
    opt = OPTIMIZERS["scaled"](model, capture="rows")
    x, y, mask = padded_batch(4, 1, seed=0)
    (0.5 * ((model(x) - y).square().sum(1) * mask).sum()).backward()
    before = [site.chunks[0][0] for site in opt._sites]
    opt._capture.settle()
    assert [site.chunks[0][0] for site in opt._sites] == before and all(site.rows == 4 for site in opt._sites)
    q = opt._sites[0]
    torch.testing.assert_close(q.dead_sx, x[4:].square().sum(0))
    opt.step()
    assert all(site.dead_rows == 0 and site.dead_sx is None for site in opt._sites)  # released with the rows


def test_a_micro_batch_without_rows_adds_nothing():
    """A micro-batch whose every label is masked has no row with gradient: its rows are held
    unchecked (no host synchronisation in backward) and dropped whole before the step reads them
    (``Capture.settle``), and the step is the step of the other micro-batches."""
    with_empty, without = make_model(), make_model()
    opts = [oplora.ScaledOPLoRA(m, lr=0.01, seed=0) for m in (with_empty, without)]
    x, y, _ = padded_batch(5, 0, seed=1)
    for model, opt, empty in ((with_empty, opts[0], True), (without, opts[1], False)):
        opt.zero_grad()
        if empty:
            (0.0 * model(x).sum()).backward()
            assert all(site.held for site in opt._sites)  # rows held, or folded (their live count: 0, on the device)
            opt._capture.settle()
            assert all(site.rows == 0 and not site.held for site in opt._sites) and opt.capture_bytes() == 0
        (0.5 * (model(x) - y).square().sum(1).mean()).backward()
        opt.step()
    assert_same(with_empty, without, 1e-12)
