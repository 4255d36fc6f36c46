"""What must never silently mis-train: loss scaling (``scaler.unscale_`` included), passes that do
not accumulate into the factors, empty batches, inputs changed after backward, replicas,
half-done steps."""

import copy

import pytest
import torch
from training_cases import OPTIMIZERS, batch, loss_fn, make_model, same, snapshot

import oplora
from oplora import backends as _backend


@pytest.mark.parametrize("unscale", [False, True], ids=["step", "unscale_-then-step"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_steps_equal_unscaled_steps(name, unscale):
    """``scaler.step(opt)`` unscales the captured sD with ``.grad``; after ``scaler.unscale_(opt)``
    (which writes ``.grad`` without bumping versions) the step compares the factors' gradients with
    their mark and unscales the captured sD alike."""
    plain, scaled = make_model(), make_model()
    opt_plain, opt_scaled = OPTIMIZERS[name](plain), OPTIMIZERS[name](scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for seed in range(3):
        x, y = batch(seed)
        opt_plain.zero_grad()
        loss_fn(plain, x, y).backward()
        opt_plain.step()
        opt_scaled.zero_grad()
        scaler.scale(loss_fn(scaled, x, y)).backward()
        if unscale:
            scaler.unscale_(opt_scaled)
        scaler.step(opt_scaled)
        scaler.update()
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_skips_an_overflowing_step_whole(name):
    model = make_model()
    opt = OPTIMIZERS[name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch()
    scaler.scale(loss_fn(model, x, y)).backward()
    scaler.step(opt)
    scaler.update()
    snap = snapshot(model, opt)
    opt.zero_grad()
    x[0, 0] = float("inf")
    scaler.scale(loss_fn(model, x, y)).backward()
    scaler.step(opt)
    scaler.update()
    assert same(model, opt, snap)
    assert scaler.get_scale() == 2.0**9
    assert all(not site.rows for site in opt._sites)


def test_input_gradients_and_partial_backward_are_not_captured():
    model = make_model()
    opt = oplora.OPLoRA(model, capture="rows")
    x, y = batch()
    x.requires_grad_(True)
    torch.autograd.grad(loss_fn(model, x, y), x)
    loss_fn(model, x, y).backward(inputs=[x])
    assert all(not site.rows for site in opt._sites)
    loss_fn(model, x, y).backward()
    assert all(len(site.chunks) == 1 for site in opt._sites)


@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_empty_micro_batch_adds_nothing(name):
    model, twin = make_model(), make_model()
    opt, opt_twin = OPTIMIZERS[name](model), OPTIMIZERS[name](twin)
    x, y = batch()
    loss_fn(model, x[:0], y[:0]).sum().backward()  # zero rows (the mean is NaN; nothing flows)
    assert all(not site.rows for site in opt._sites)
    for p in model.parameters():
        p.grad = None
    loss_fn(model, x, y).backward()
    loss_fn(twin, x, y).backward()
    opt.step()
    opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_input_changed_in_place_after_backward_is_refused():
    model = make_model()
    opt = oplora.OPLoRA(model, lr=0.05, capture="rows")  # folded rows no longer read X
    x, y = batch()
    loss_fn(model, x, y).backward()
    x.mul_(2.0)  # a reused input buffer refilled before step()
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"'0'.*modified in place"):
        opt.step()
    assert same(model, opt, snap)


def test_data_parallel_replicas_are_refused():
    model = make_model()
    opt = oplora.OPLoRA(model)
    # A DataParallel replica is a shallow copy: it shares the original's hook dicts.
    replica = copy.copy(model[0].lora_A)
    with pytest.raises(RuntimeError, match="DataParallel"):
        replica(torch.randn(2, 10))
    assert opt.lora_layers == ["0", "2"]


def _counting_solves(monkeypatch, fail_at=None):
    """Patch the backends' ``prox_solve`` to count its passes, raising in pass ``fail_at``."""
    real = _backend.ops_for
    calls = []

    def patched(device):
        ops = real(device)

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at:
                raise torch.linalg.LinAlgError("injected")
            return ops.prox_solve(*args, **kwargs)

        return ops._replace(prox_solve=counted)

    monkeypatch.setattr(_backend, "ops_for", patched)
    return calls


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_a_failing_solve_leaves_factors_and_state_untouched(monkeypatch, preset):
    x, y = batch()
    with monkeypatch.context() as m:  # how many solve passes a first step makes
        calls = _counting_solves(m)
        model = make_model()
        opt = oplora.ScaledOPLoRA(model, lr=0.01, seed=0, preset=preset)
        loss_fn(model, x, y).backward()
        opt.step()
    passes = len(calls)
    assert passes >= 2
    model = make_model()
    opt = oplora.ScaledOPLoRA(model, lr=0.01, seed=0, preset=preset)
    _counting_solves(monkeypatch, fail_at=passes)  # the last pass, after the earlier ones succeeded
    loss_fn(model, x, y).backward()
    snap = snapshot(model, opt)
    with pytest.raises(torch.linalg.LinAlgError):
        opt.step()
    assert same(model, opt, snap) and not opt.state


def test_riemannian_writes_contiguous_gradients():
    model = make_model()
    opt = oplora.RiemannianLoRA(model, lr=0.05)
    x, y = batch()
    loss_fn(model, x, y).backward()
    opt.step()
    assert all(p.grad.is_contiguous() for p in opt.lora_group["params"])
