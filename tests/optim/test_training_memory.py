"""A long training loop keeps memory flat: after 1,000 steps (with gradient accumulation, and
every 10 steps an evaluation forward with grad enabled and never back-propagated and an
input-gradient call) no captured tensor, pending input, hook or state entry has piled up, and the number
of live tensors is what it was after the first steps."""

import gc

import pytest
import torch

import oplora

from training_cases import batch, loss_fn, make_model

STEPS = 1000
EARLY = 50


def live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


def state_shapes(opt):
    return {id(p): {k: tuple(v.shape) for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}


@pytest.mark.parametrize("capture", ["rows", "auto"])
def test_a_thousand_steps_keep_memory_flat(capture):
    model = make_model()
    # The cheapest step (the loop is tested), at an lr that does not diverge over 1,000 steps (a saturated
    # tanh would zero a layer's output gradient, and rows without gradient are not captured).
    opt = oplora.OPLoRA(model, lr=0.002, iters=0, seed=0, capture=capture)
    hooks = hook_counts(model)
    x, y = batch(rows=16)
    probe = x[:2].clone().requires_grad_(True)
    early = None
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x[:8], y[:8]).backward()
        loss_fn(model, x[8:], y[8:]).backward()
        if step % 10 == 0:  # a leak per call would still show as ~100 leftovers
            loss_fn(model, x, y)  # evaluated with grad enabled, never back-propagated
            torch.autograd.grad(loss_fn(model, probe, y[:2]), probe)  # an input gradient
        assert [site.rows for site in opt._sites] == [16, 16]
        assert [len(site.chunks) for site in opt._sites] == ([2, 2] if capture == "rows" else [0, 0])  # folded
        opt.step()
        assert all(not site.rows and not site._pending and not site.x_versions and site.folded is None
                   for site in opt._sites)
        if step == EARLY:
            early = (live_tensors(), state_shapes(opt))
    assert (live_tensors(), state_shapes(opt)) == early
    assert hook_counts(model) == hooks
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()
    assert all(pre == 0 and post == 0 for pre, post in hook_counts(model))
