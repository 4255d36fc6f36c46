"""``examples/lorsum_start.py``'s measure: the share of the optimal decrease of the LoRSum objective
each (start, iters, prox) variant reaches, checked where its value is known."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import lorsum_start  # noqa: E402


def _problem(zero_b: bool):
    g = torch.Generator().manual_seed(0)
    m, n, r = 40, 30, 3
    # A gradient with a clear rank-r head, so that the optimum is well separated.
    grad = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    grad += 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)
    b = torch.zeros(m, r, dtype=torch.float64) if zero_b else 0.1 * torch.randn(m, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, n, generator=g, dtype=torch.float64) / n ** 0.5
    return b, a, grad


def test_shares_from_b_zero_show_which_half_step_can_move():
    b, a, grad = _problem(zero_b=True)
    shares = lorsum_start.decrease_shares(b, a, grad, lr=1.0)
    label = lorsum_start.label
    # Start A with B = 0: A cannot move; B only projects -lr G onto A0's rows (r/n of a random G's energy).
    assert 0.0 < shares[label("A", 1, 0.0)] < 0.5
    # Start B without prox is one block power iteration from A0: most of the optimum; a second round more.
    assert shares[label("B", 1, 0.0)] > 0.9
    assert shares[label("B", 2, 0.0)] >= shares[label("B", 1, 0.0)] - 1e-12
    assert all(-1e-9 <= v <= 1 + 1e-9 for v in shares.values()), shares


def test_an_absolute_prox_freezes_a_while_b_is_small():
    b, a, grad = _problem(zero_b=True)
    label = lorsum_start.label
    small = lorsum_start.decrease_shares(b, a, grad, lr=1e-6)  # B after the first half-step ~ 1e-6: B^T B << lr * 1e-2
    assert small[label("B", 2, 1e-2)] < 0.5 < small[label("B", 2, 0.0)]
    large = lorsum_start.decrease_shares(b, a, grad, lr=1.0)  # B^T B >> lr * 1e-2: the prox barely matters
    assert large[label("B", 2, 1e-2)] > 0.9


@pytest.mark.parametrize("zero_b", [False, True])
def test_alternating_rounds_never_lose_ground(zero_b):
    b, a, grad = _problem(zero_b)
    shares = lorsum_start.decrease_shares(b, a, grad, lr=0.5)
    label = lorsum_start.label
    # Alternating exact least squares decreases ||BA - T||^2 at every half-step (without prox).
    assert shares[label("B", 2, 0.0)] >= shares[label("B", 1, 0.0)] - 1e-12
