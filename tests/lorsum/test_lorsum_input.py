"""oplora.lorsum, continued (``test_lorsum``): bad input refused with a ValueError naming the
argument, huge finite values, no autograd history, and the dispatch (the reference on CPU, the
kernels on a GPU against the explicit float64 oracle)."""

import itertools

import pytest
import torch
from explicit import TOL, explicit_lorsum, rel_err, with_condition
from test_lorsum import make_problem

import oplora
from oplora import reference


# ---------------------------------------------------------------------------------------- bad input

def _good():
    terms, coeffs, init, _ = make_problem(12, 10, 3, 4, dtype=torch.float32)
    return {"terms": terms, "coeffs": coeffs, "init": init, "iters": 1, "prox": 0.0}


def _call(args):
    args = dict(args)
    return oplora.lorsum(args.pop("terms"), args.pop("coeffs"), args.pop("init"), **args)


def _with_nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


BAD = {
    "not-chain": (lambda g: g["terms"].__setitem__(1, (torch.randn(12, 4), torch.randn(5, 10))), r"terms\[1\].*do not chain"),
    "term-rows": (lambda g: g["terms"].__setitem__(1, (torch.randn(13, 4), torch.randn(4, 10))), r"terms\[1\]\[0\].*m = 12"),
    "term-cols": (lambda g: g["terms"].__setitem__(2, (torch.randn(12, 2), torch.randn(2, 9))), r"terms\[2\]\[1\].*n = 10"),
    "term-not-pair": (lambda g: g["terms"].__setitem__(0, (torch.randn(12, 3),)), r"terms\[0\] must be a pair"),
    "term-3d": (lambda g: g["terms"].__setitem__(1, (torch.randn(12, 4, 1), torch.randn(4, 10))), r"terms\[1\]\[0\].*2-D"),
    "term-int": (lambda g: g["terms"].__setitem__(1, (torch.ones(12, 4, dtype=torch.int64), torch.randn(4, 10))), r"terms\[1\]\[0\].*float"),
    "term-nan": (lambda g: g["terms"].__setitem__(1, (_with_nan(g["terms"][1][0]), g["terms"][1][1])), r"terms\[1\]\[0\].*NaN"),
    "term-inf": (lambda g: g["terms"].__setitem__(2, (g["terms"][2][0], g["terms"][2][1] / 0)), r"terms\[2\]\[1\].*NaN or Inf"),
    "term-device": (lambda g: g["terms"].__setitem__(1, (torch.empty(12, 4, device="meta"), torch.randn(4, 10))), r"terms\[1\]\[0\] is on meta"),
    "terms-empty": (lambda g: g.__setitem__("terms", []), r"terms must be a non-empty"),
    "empty-m": (lambda g: g.update(init=(torch.randn(0, 3), torch.randn(3, 10)),
                                   terms=[(torch.randn(0, 2), torch.randn(2, 10))], coeffs=[1.0]), r"init: .*at least 1"),
    "empty-n": (lambda g: g.update(init=(torch.randn(12, 3), torch.randn(3, 0)),
                                   terms=[(torch.randn(12, 2), torch.randn(2, 0))], coeffs=[1.0]), r"init: .*at least 1"),
    "all-meta": (lambda g: g.update(init=tuple(t.to("meta") for t in g["init"]),
                                    terms=[tuple(t.to("meta") for t in p) for p in g["terms"]]), r"init\[0\] \(B0\) is a meta tensor"),
    "ranks-differ": (lambda g: g.__setitem__("init", (torch.randn(12, 3), torch.randn(4, 10))), r"init: ranks differ"),
    "init-dtypes": (lambda g: g.__setitem__("init", (g["init"][0], g["init"][1].double())), r"init: B0 is torch.float32 but A0"),
    "init-nan": (lambda g: g.__setitem__("init", (_with_nan(g["init"][0]), g["init"][1])), r"init\[0\] \(B0\) contains NaN"),
    "init-not-pair": (lambda g: g.__setitem__("init", g["init"][0]), r"init must be a pair"),
    "init-device": (lambda g: g.__setitem__("init", (g["init"][0], torch.empty(3, 10, device="meta"))), r"init: B0 is on cpu but A0"),
    "coeffs-length": (lambda g: g.__setitem__("coeffs", [1.0, 2.0]), r"coeffs must give one coefficient per term \(3\)"),
    "coeff-nan": (lambda g: g["coeffs"].__setitem__(1, float("nan")), r"coeffs\[1\] must be finite"),
    "coeff-str": (lambda g: g["coeffs"].__setitem__(0, "1"), r"coeffs\[0\] must be a real number"),
    "iters-negative": (lambda g: g.__setitem__("iters", -1), r"iters must be an integer >= 0"),
    "iters-float": (lambda g: g.__setitem__("iters", 1.5), r"iters must be an integer"),
    "iters-bool": (lambda g: g.__setitem__("iters", True), r"iters must be an integer"),
    "prox-negative": (lambda g: g.__setitem__("prox", -1e-3), r"prox must be >= 0"),
    "prox-nan": (lambda g: g.__setitem__("prox", float("nan")), r"prox must be finite"),
    "start": (lambda g: g.__setitem__("start", "C"), r"start must be 'A' or 'B'"),
    "precondition-no-metric": (lambda g: g.__setitem__("precondition", [False, True, True]), r"no metric is given"),
    "precondition-identity-metric": (lambda g: g.update(precondition=[False, True, True], metric=(None, None)), r"no metric is given"),
    "precondition-not-bool": (lambda g: g.update(precondition=[0, 2, 1], metric=(torch.ones(12), None)), r"precondition flags must be booleans"),
    "iters-float-tensor": (lambda g: g.__setitem__("iters", torch.tensor(1.0)), r"iters must be an integer"),
    "precondition-length": (lambda g: g.update(precondition=[True], metric=(None, None)), r"precondition must give one flag per term"),
    "metric-not-pair": (lambda g: g.__setitem__("metric", torch.ones(12)), r"metric must be a pair"),
    "metric-negative": (lambda g: g.__setitem__("metric", (-torch.ones(12), None)), r"metric\[0\] \(M_out\) must be positive"),
    "metric-zero": (lambda g: g.__setitem__("metric", (None, torch.zeros(10))), r"metric\[1\] \(M_in\) must be positive"),
    "metric-length": (lambda g: g.__setitem__("metric", (torch.ones(11), None)), r"metric\[0\].*length 11, but m = 12"),
    "metric-shape": (lambda g: g.__setitem__("metric", (None, torch.eye(9))), r"metric\[1\].*10 x 10 matrix"),
    "metric-nonsym": (lambda g: g.__setitem__("metric", (torch.eye(12) + torch.triu(torch.ones(12, 12), 1), None)), r"not symmetric"),
    "metric-indefinite": (lambda g: g.__setitem__("metric", (torch.diag(torch.linspace(-1, 1, 12)), None)), r"Cholesky"),
    "metric-nan": (lambda g: g.__setitem__("metric", (None, _with_nan(torch.ones(10)))), r"metric\[1\] \(M_in\) contains NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error_naming_the_argument(case):
    mutate, pattern = BAD[case]
    args = _good()
    args["terms"] = list(args["terms"])
    args["coeffs"] = list(args["coeffs"])
    mutate(args)
    with pytest.raises(ValueError, match=pattern):
        _call(args)


def test_good_input_of_the_bad_input_table_runs():
    b, a = _call(_good())
    assert b.shape == (12, 3) and a.shape == (3, 10)


def test_huge_finite_values_are_not_mistaken_for_inf():
    """The fast finite check sums each tensor; an overflowing sum must fall back, not raise."""
    args = _good()
    huge = torch.full((12, 2), 3e38)
    args["terms"] = list(args["terms"]) + [(huge, torch.ones(2, 10))]
    args["coeffs"] = list(args["coeffs"]) + [0.0]
    b, a = _call(args)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()


def test_results_carry_no_autograd_history():
    terms, coeffs, init, _ = make_problem(9, 8, 2, 3)
    init = (init[0].requires_grad_(), init[1].requires_grad_())
    b, a = oplora.lorsum([init, terms[1]], coeffs[:2], init)
    assert not b.requires_grad and not a.requires_grad


# ---------------------------------------------------------------------------------------- dispatch

def test_public_function_is_the_reference_on_cpu():
    terms, coeffs, init, kw = make_problem(15, 12, 3, 4, dtype=torch.float32, metric="diag-pre")
    got = oplora.lorsum(terms, coeffs, init, iters=2, prox=0.1, **kw)
    want = reference.lorsum(terms, coeffs, init, iters=2, prox=0.1, **kw)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.cuda
@pytest.mark.parametrize("iters,prox", list(itertools.product([0, 1, 2], [0.0, 1e-2])))
def test_cuda_matches_explicit(iters, prox):
    terms, coeffs, init, kw = make_problem(130, 70, 8, 33, dtype=torch.float32, metric="diag-pre")
    move = lambda t: t.cuda()  # noqa: E731
    terms_c = [(move(u), move(v)) for u, v in terms]
    kw_c = {"metric": tuple(move(t) for t in kw["metric"]), "precondition": kw["precondition"]}
    b, a = oplora.lorsum(terms_c, coeffs, (move(init[0]), move(init[1])), iters=iters, prox=prox, **kw_c)
    be, ae = explicit_lorsum(terms, coeffs, init, iters=iters, prox=prox, **kw)
    assert b.is_cuda and a.is_cuda
    assert rel_err(b.cpu() @ a.cpu(), be @ ae) < TOL[torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("iters", [0, 1, 2])
def test_cuda_ill_conditioned_float32(iters):
    m, n, r = 300, 220, 16
    b0 = with_condition(m, r, 1e4, torch.float32)
    a0 = with_condition(r, n, 1e4, torch.float32)
    d, x = torch.randn(m, 48), torch.randn(48, n)
    terms, coeffs = [(b0, a0), (d, x)], [1.0, -1e-3]
    b, a = oplora.lorsum([(u.cuda(), v.cuda()) for u, v in terms], coeffs, (b0.cuda(), a0.cuda()), iters=iters)
    b64, a64 = oplora.lorsum([(u.double(), v.double()) for u, v in terms], coeffs, (b0.double(), a0.double()),
                             iters=iters)
    assert rel_err(b.cpu().double() @ a.cpu().double(), b64 @ a64) < TOL["cond1e4"]
