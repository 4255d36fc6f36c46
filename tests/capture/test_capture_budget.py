"""``capture_budget=`` and the sketched gradient (``oplora.capture.sketch``): rows while they fit (never
folded), then the layer's dense fold or its sketch; a sketch whose size does not grow with tokens,
exact when the gradient's rank is within it and exact on the layer's own factors always; steps
against the exact capture's; the memory model's count of it; the refusals."""

import copy

import pytest
import torch
from torch import nn

import oplora
from oplora.memory_model import capture_memory
from oplora.capture.sketch import Sketch, sketch_numbers

N, H, M, R, K = 120, 90, 8, 3, 6
F64 = torch.float64


def make_model(dtype=F64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N, H, dtype=dtype), nn.Tanh(), nn.Linear(H, M, dtype=dtype))
    oplora.add_lora(model, ["0", "2"], r=R, alpha=2 * R)
    for i in (0, 2):
        nn.init.normal_(model[i].lora_B.weight, std=0.3)
    return model


def batches(count, rows, rank=None, seed=1, dtype=F64):
    """``count`` micro-batches of ``rows`` rows; with ``rank`` every input lies in one ``rank``-
    dimensional subspace (so the first layer's gradient has rank <= rank)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, N, generator=gen, dtype=dtype) if rank else None
    out = []
    for _ in range(count):
        x = torch.randn(rows, rank or N, generator=gen, dtype=dtype)
        out.append((x @ basis if rank else x, torch.randn(rows, M, generator=gen, dtype=dtype)))
    return out


def train(model, opt, steps, micro):
    held, forms = [], []
    for step in range(steps):
        for x, y in micro[step]:
            ((model(x) - y) ** 2).mean().backward()
        held.append(opt.capture_bytes())
        forms.append([type(s.folded).__name__ if s.folded is not None else "rows" for s in opt._sites])
        opt.step()
        opt.zero_grad()
    return held, forms


def factors(model):
    return [p.detach().clone() for n, p in model.named_parameters() if "lora" in n]


def rel(a, b):
    return float((a - b).norm() / b.norm())


# --- the sketch itself ------------------------------------------------------------------------------
def test_a_sketch_is_exact_within_its_rank_and_on_the_factors_always():
    gen = torch.Generator().manual_seed(0)
    m, n, r, k = 70, 50, 4, 6
    b0, a0 = torch.randn(m, r, generator=gen, dtype=F64), torch.randn(r, n, generator=gen, dtype=F64)
    for rows, exact in ((5, True), (300, False)):
        x, g = torch.randn(rows, n, generator=gen, dtype=F64), torch.randn(rows, m, generator=gen, dtype=F64)
        sk = Sketch.empty(b0, a0, k, seed=3, dtype=F64, stats="diag")
        sk.add(x[: rows // 2], g[: rows // 2])
        sk.add(x[rows // 2:], g[rows // 2:])
        full = g.mT @ x
        p, q = sk.low_rank()
        assert p.shape[1] == q.shape[0] <= 2 * r + k
        assert (rel(p @ q, full) < 1e-10) == exact  # rank 5 <= r + k; a flat rank-50 gradient is not
        assert rel(sk.times(a0.mT), full @ a0.mT) < 1e-10 and rel(sk.t_times(b0), b0.mT @ full) < 1e-10
        fb, fa = sk.factor_products(b0, a0)
        assert rel(fb, full @ a0.mT) < 1e-12 and rel(fa, b0.mT @ full) < 1e-12
        assert torch.allclose(sk.sx, x.square().sum(0)) and torch.allclose(sk.sg, g.square().sum(0))
        assert sk.rows == rows
    assert sum(t.numel() for t in sk.tensors()) == sketch_numbers(m, n, r, k, "diag")


def test_a_sketch_from_b_zero_is_exact_on_a():
    """PEFT starts LoRA at B = 0: the correction has nothing to project, the A side stays exact."""
    gen = torch.Generator().manual_seed(1)
    b0, a0 = torch.zeros(40, 3, dtype=F64), torch.randn(3, 30, generator=gen, dtype=F64)
    x, g = torch.randn(100, 30, generator=gen, dtype=F64), torch.randn(100, 40, generator=gen, dtype=F64)
    sk = Sketch.empty(b0, a0, 4, seed=0, dtype=F64, stats=None)
    sk.add(x, g)
    assert rel(sk.times(a0.mT), g.mT @ x @ a0.mT) < 1e-10
    sk.scale(0.5)
    assert rel(sk.times(a0.mT), 0.5 * g.mT @ x @ a0.mT) < 1e-10


# --- the optimizers with a budget -------------------------------------------------------------------
@pytest.mark.parametrize("cls", [oplora.OPLoRA, oplora.ScaledOPLoRA])
def test_a_budget_sketches_a_layer_and_the_step_is_exact_within_the_sketch_rank(cls):
    """Inputs of rank 5 <= r + k: the first layer's gradient is sketched exactly, so every step
    equals the exact capture's (the second layer, whose input is not low-rank, is too small to
    sketch: its dense fold is smaller and exact)."""
    micro = [batches(2, 40, rank=5, seed=s) for s in range(3)]
    exact_model, model = make_model(), make_model()
    exact = cls(exact_model, lr=0.01, seed=0)
    budget = cls(model, lr=0.01, seed=0, capture_budget=0, sketch_rank=K)
    train(exact_model, exact, 3, micro)
    held, forms = train(model, budget, 3, micro)
    assert forms[0] == ["Sketch", "Folded"]
    for got, want in zip(factors(model), factors(exact_model)):
        assert rel(got, want) < 1e-9
    for mine, theirs in zip(budget._sites, exact._sites):
        for key, value in exact.state[theirs.B].items():
            if torch.is_tensor(value) and value.abs().max() > 0:
                assert rel(budget.state[mine.B][key], value) < 1e-8, key
    assert budget.capture_bytes() == 0  # released at the step


def test_what_is_held_does_not_grow_with_tokens_once_sketched():
    model = make_model()
    opt = oplora.ScaledOPLoRA(model, lr=0.003, seed=0, capture_budget=0, sketch_rank=K)
    train(model, opt, 1, [batches(1, 200)])  # B and A moved: the next sketches are of a trained layer
    sizes = []
    for micro in (1, 4):
        for x, y in batches(micro, 200, seed=micro):
            ((model(x) - y) ** 2).mean().backward()
        sizes.append(opt.capture_bytes())
        opt.zero_grad()
    sketch = 8 * sketch_numbers(H, N, R, K, "diag")
    dense = 8 * (M * H + M + H)
    assert sizes[0] == sizes[1] == sketch + dense
    opt.close()


def test_a_large_budget_holds_the_rows_and_never_folds():
    """Within the budget nothing is folded -- not even past the size at which capture='auto'
    folds (the fold's GEMM stays off the backward pass) -- and the steps are the rows' own."""
    micro = [batches(3, 200, seed=s) for s in range(2)]
    auto_model, model = make_model(), make_model()
    auto = oplora.OPLoRA(auto_model, lr=0.01, seed=0)
    budget = oplora.OPLoRA(model, lr=0.01, seed=0, capture_budget=10**9)
    _, auto_forms = train(auto_model, auto, 2, micro)
    held, forms = train(model, budget, 2, micro)
    assert auto_forms[0] == ["Folded", "Folded"] and forms[0] == ["rows", "rows"]
    assert held[0] == 3 * 200 * (N + H + H + M) * 8
    for got, want in zip(factors(model), factors(auto_model)):
        assert rel(got, want) < 1e-12


def test_sketch_rank_none_folds_exactly_past_the_budget():
    """``sketch_rank=None``: rows while they fit, then each layer that crosses the budget folds into
    its dense gradient -- never a sketch, so every step is the exact capture's -- and what is held is
    what the memory model counts (per layer the least of its rows and dense gradient)."""
    micro = [batches(3, 200, seed=s) for s in range(2)]
    rows_model, model, tight_model = make_model(), make_model(), make_model()
    rows = oplora.ScaledOPLoRA(rows_model, lr=0.003, seed=0, capture="rows")
    roomy = oplora.ScaledOPLoRA(model, lr=0.003, seed=0, capture_budget=10**9, sketch_rank=None)
    tight = oplora.ScaledOPLoRA(tight_model, lr=0.003, seed=0, capture_budget=0, sketch_rank=None)
    train(rows_model, rows, 2, micro)
    _, roomy_forms = train(model, roomy, 2, micro)
    held, tight_forms = train(tight_model, tight, 2, micro)
    assert roomy_forms[0] == ["rows", "rows"] and tight_forms[0] == ["Folded", "Folded"]
    for fast, exact, want in zip(factors(model), factors(tight_model), factors(rows_model)):
        assert rel(fast, want) < 1e-12 and rel(exact, want) < 1e-10
    assert held[0] == 8 * (H * N + H + N + M * H + M + H)  # the two dense folds and their K-FAC sums
    counted = capture_memory(make_model(), tokens=200, micro_batches=3, activation_dtype=F64, sketch_rank=None)
    assert counted.sketched == 0 and counted.bounded == 4 * (H * N + M * H)  # float32 folds (the model's count)
    with pytest.raises(ValueError, match="sketch_rank"):
        oplora.OPLoRA(make_model(), lr=0.01, capture_budget=0, sketch_rank=2.5)


def test_rows_are_kept_while_they_are_smaller_than_the_sketch():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.01, seed=0, capture_budget=0, sketch_rank=K)
    _, forms = train(model, opt, 1, [batches(1, 3)])
    assert forms[0] == ["rows", "rows"]


def test_a_fraction_of_free_memory_and_the_rescale_of_grad():
    """A float budget is a fraction of the device's free memory (plenty here: rows are held); a
    clip_grad_norm_ of the factors' .grad after backward rescales a sketch as it does rows."""
    micro = [batches(2, 40, rank=5, seed=s) for s in range(2)]
    ref_model, model, frac_model = make_model(), make_model(), make_model()
    ref = oplora.OPLoRA(ref_model, lr=0.01, seed=0)
    opt = oplora.OPLoRA(model, lr=0.01, seed=0, capture_budget=0, sketch_rank=K)
    frac = oplora.OPLoRA(frac_model, lr=0.01, seed=0, capture_budget=0.5)
    for step in range(2):
        for mdl, o in ((ref_model, ref), (model, opt), (frac_model, frac)):
            for x, y in micro[step]:
                ((mdl(x) - y) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_([p for p in mdl.parameters() if p.requires_grad], 0.01)
            if o is frac:
                assert all(s.folded is None for s in o._sites)
            o.step()
            o.zero_grad()
    for got, want in zip(factors(model), factors(ref_model)):
        assert rel(got, want) < 1e-9
    for got, want in zip(factors(frac_model), factors(ref_model)):
        assert rel(got, want) < 1e-12


def test_max_grad_norm_reads_the_sketched_gradient():
    micro = [batches(2, 40, rank=5, seed=0)]
    ref_model, model = make_model(), make_model()
    ref = oplora.OPLoRA(ref_model, lr=0.01, seed=0, max_grad_norm=1e-3)
    opt = oplora.OPLoRA(model, lr=0.01, seed=0, max_grad_norm=1e-3, capture_budget=0, sketch_rank=K)
    train(ref_model, ref, 1, micro)
    train(model, opt, 1, micro)
    assert opt.grad_norm() == pytest.approx(ref.grad_norm(), rel=1e-9) and ref.grad_norm() > 1e-3  # clipped
    for got, want in zip(factors(model), factors(ref_model)):
        assert rel(got, want) < 1e-9


def test_a_copy_keeps_the_budget():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.01, seed=0, capture_budget=0, sketch_rank=K)
    twin = copy.deepcopy(opt)
    assert twin._capture.budget == 0 and twin._capture.sketch_rank == K
    opt.close()


def test_bad_budgets_and_unsupported_combinations_are_refused():
    model = make_model()
    for bad, match in ((-1, ">= 0"), (1.5, r"\(0, 1\]"), (0.0, r"\(0, 1\]"), (True, "bytes"), ("1GB", "bytes")):
        with pytest.raises(ValueError, match=match):
            oplora.OPLoRA(model, lr=0.01, capture_budget=bad)
    with pytest.raises(ValueError, match="capture='auto'"):
        oplora.OPLoRA(model, lr=0.01, capture="rows", capture_budget=0)
    with pytest.raises(ValueError, match="sketch_rank"):
        oplora.OPLoRA(model, lr=0.01, capture_budget=0, sketch_rank=0)
    with pytest.raises(ValueError, match="shampoo"):
        oplora.ScaledOPLoRA(model, lr=0.01, statistics="shampoo", metric_power=0.25, capture_budget=0)
    with pytest.raises(TypeError):
        oplora.SVDLoRA(model, lr=0.01, capture_budget=0)  # it forms the m x n gradient anyway


def test_dense_statistics_fold_densely_under_a_budget():
    """metric='dense' keeps the rows' Grams: a layer over the budget folds densely (exact)."""
    micro = [batches(2, 200, seed=s) for s in range(2)]
    ref_model, model = make_model(), make_model()
    ref = oplora.ScaledOPLoRA(ref_model, lr=0.003, seed=0, metric="dense")
    opt = oplora.ScaledOPLoRA(model, lr=0.003, seed=0, metric="dense", capture_budget=0)
    train(ref_model, ref, 2, micro)
    _, forms = train(model, opt, 2, micro)
    assert forms[0] == ["Folded", "Folded"]
    for got, want in zip(factors(model), factors(ref_model)):
        assert rel(got, want) < 1e-10


def test_the_memory_model_counts_the_bounded_capture():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    one = capture_memory(cfg, tokens=2048, micro_batches=1, targets=targets, r=16)
    eight = capture_memory(cfg, tokens=2048, micro_batches=8, targets=targets, r=16)
    assert one.bounded == eight.bounded and eight.sketched == 224  # does not grow with tokens
    per_block = (4 * sketch_numbers(4096, 4096, 16, 64, None) + 2 * sketch_numbers(11008, 4096, 16, 64, None)
                 + sketch_numbers(4096, 11008, 16, 64, None))
    assert eight.bounded == 4 * 32 * per_block
    assert eight.held("bounded") < 2 * 2**30 < eight.held("auto")  # the goal: <= 2 GiB at 7B, 16k tokens


def test_embedding_and_conv_layers_are_sketched():
    """PEFT Embedding LoRA (X: one-hot token ids, never formed) and Conv1d LoRA (X: patches) go to
    a sketch like linear layers: the embedding's gradient has one column per distinct token (5 <=
    r + k here), so its steps are exact; the conv's are close."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv, self.head = nn.Embedding(500, 300), nn.Conv1d(300, 200, 3), nn.Linear(200, 4)

        def forward(self, ids):
            return self.head(torch.tanh(self.conv(self.emb(ids).transpose(1, 2))).mean(-1))

    def build(targets):
        torch.manual_seed(0)
        net = peft.get_peft_model(Net().double(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets))
        for name, p in net.named_parameters():
            if "_B" in name:
                nn.init.normal_(p, std=0.1)
        return net

    gen = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 5, (4, 30), generator=gen), torch.randint(0, 4, (4,), generator=gen)) for _ in range(3)]
    for targets, tol in ((["emb"], 1e-10), (["emb", "conv"], 2e-2)):
        got = {}
        for budget in (None, 0):
            net = build(targets)
            opt = oplora.OPLoRA(net, lr=0.05, seed=0, capture_budget=budget, sketch_rank=8)
            for ids, y in data:
                nn.functional.cross_entropy(net(ids), y).backward()
                if budget == 0:
                    assert all(type(s.folded).__name__ == "Sketch" for s in opt._sites)
                opt.step()
                opt.zero_grad()
            got[budget] = [p.detach().clone() for n, p in net.named_parameters() if "lora" in n]
        assert max(rel(a, b) for a, b in zip(got[0], got[None])) < tol
