"""The step pauses Python's cyclic garbage collector (``LoRAOptimizer.step``): its thousands of
short-lived objects come and go by reference counting without a collection moving them into the
older generations (and so without the full collections those add up to). The collector's state is
restored as the step ends, also when it raises, and a caller's ``gc.disable()`` is kept."""

import gc

import pytest
from training_cases import batch, loss_fn, make_model

import oplora


@pytest.fixture
def eager_collector():
    """A collector that would run at every few allocations, so that a step without the pause
    certainly collects; the thresholds and state are restored afterwards."""
    thresholds, enabled = gc.get_threshold(), gc.isenabled()
    gc.set_threshold(5, 1, 1)
    gc.enable()
    yield
    gc.set_threshold(*thresholds)
    (gc.enable if enabled else gc.disable)()


@pytest.mark.parametrize("name", ["OPLoRA", "ScaledOPLoRA"])
def test_no_collection_during_the_step(eager_collector, monkeypatch, name):
    """Inside the step's solve (where its objects are made) the collector is off and never runs;
    it is on again after the step."""
    from oplora.optim import engine

    events, states = [], []
    solve = engine.solve

    def seen(phase, info):
        if phase == "start":
            events.append(info["generation"])

    def watched(*args, **kwargs):
        states.append(gc.isenabled())
        gc.callbacks.append(seen)
        try:
            return solve(*args, **kwargs)
        finally:
            gc.callbacks.remove(seen)

    monkeypatch.setattr(engine, "solve", watched)
    model = make_model()
    opt = getattr(oplora, name)(model, lr=1e-2)
    x, y = batch()
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        assert gc.isenabled()
    assert states == [False, False] and events == []
    opt.close()


def test_the_collector_state_is_restored_also_when_the_step_raises(eager_collector):
    model = make_model()
    opt = oplora.OPLoRA(model, lr=1e-2)
    x, y = batch()
    loss_fn(model, x, y).backward()
    gc.disable()
    opt.step()
    assert not gc.isenabled()  # the caller's choice is kept
    gc.enable()
    opt.zero_grad()
    x[0, 0] = float("nan")  # the captured X: refused inside the step, before anything moves
    loss_fn(model, x, y).backward()
    with pytest.raises(FloatingPointError, match="NaN"):
        opt.step()
    assert gc.isenabled()
    opt.close()
