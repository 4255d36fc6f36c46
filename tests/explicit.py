"""Test-only float64 oracle: LoRSum computed with the explicit m x n target and normal equations.

This is the literal SPEC formula (allowed in tests, never in the package): it forms
``T = sum c_i T_i`` and solves ``(B^T M_out B + lam I) A = lam A0 + B^T M_out T`` and
``B (A M_in A^T + lam I) = lam B0 + T M_in A^T`` in float64. For a singular system (lam = 0,
rank-deficient factor) it takes the limit lam -> 0+: ``G^+ rhs + (I - G^+ G) X0``.
"""

import torch

# Tolerances in one place: relative Frobenius error of a result against the float64 oracle.
TOL = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,   # well-conditioned factors, float32 compute
    "cond1e4": 5e-4,       # SPEC section 2: float32 factors of condition number up to 1e4
}


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def metric_matrix(m, size):
    if m is None:
        return torch.eye(size, dtype=torch.float64)
    m = m.double()
    return torch.diag(m) if m.dim() == 1 else m


def explicit_target(terms, coeffs, metric=None, precondition=None):
    m, n = terms[0][0].shape[0], terms[0][1].shape[1]
    metric = metric or (None, None)
    m_out, m_in = metric_matrix(metric[0], m), metric_matrix(metric[1], n)
    precondition = precondition or [False] * len(terms)
    t = torch.zeros(m, n, dtype=torch.float64)
    for (u, v), c, pre in zip(terms, coeffs, precondition):
        ti = u.double() @ v.double()
        if pre:
            ti = torch.linalg.solve(m_out, ti) @ torch.linalg.inv(m_in)
        t += float(c) * ti
    return t, m_out, m_in


def explicit_lorsum(terms, coeffs, init, *, iters=1, prox=0.0, metric=None, precondition=None, start="A",
                    relative=False):
    """``relative``: each half-step's proximal weight is ``prox * trace(F^T M F) / r`` (F the fixed
    factor, M its side's metric) instead of ``prox``."""
    t, m_out, m_in = explicit_target(terms, coeffs, metric, precondition)
    b0, a0 = (x.double() for x in init)
    r = b0.shape[1]
    eye = torch.eye(r, dtype=torch.float64)

    def solve(gram, rhs_data, x0):
        lam = prox * gram.trace().item() / r if relative else prox
        if lam > 0:
            return torch.linalg.solve(gram + lam * eye, lam * x0 + rhs_data)
        ginv = torch.linalg.pinv(gram, hermitian=True)
        return ginv @ rhs_data + (eye - ginv @ gram) @ x0

    def a_step(b):
        return solve(b.T @ m_out @ b, b.T @ m_out @ t, a0)

    def b_step(a):
        return solve(a @ m_in @ a.T, a @ m_in @ t.T, b0.T).T

    if iters == 0:
        return b_step(a0), a_step(b0)
    b, a = b0, a0
    for _ in range(iters):
        if start == "A":
            a = a_step(b)
            b = b_step(a)
        else:
            b = b_step(a)
            a = a_step(b)
    return b, a


def truncated_svd(t, r):
    u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def with_condition(rows, cols, cond, dtype=torch.float64):
    """A rows x cols matrix (rank min(rows, cols)) with singular values log-spaced from 1 to 1/cond."""
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), k, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def spd(size, dtype=torch.float64):
    g = torch.randn(size, size, dtype=torch.float64)
    return (g @ g.T / size + 0.5 * torch.eye(size, dtype=torch.float64)).to(dtype)


# -- optimizer steps (SPEC section 3), from an explicit gradient G (m x n) --------------------

def explicit_oplora_step(b, a, g, mom, *, lr, momentum, dampening, iters, prox, metric=None, start="A",
                         step_scale=1.0, relative=False, mom_start=None, precondition_momentum=False):
    """One OPLoRA step in float64; ``mom = (Um, Vm)`` or None; with ``metric`` the Scaled step;
    ``step_scale`` multiplies the step's gradient and momentum coefficients (a bias correction);
    ``relative``: the proximal weight is ``prox`` relative to the fixed factor (not ``lr * prox``);
    ``mom_start``: the momentum problem's start side (default ``start``); ``precondition_momentum``
    (with a metric): the momentum averages preconditioned gradients and enters the step as it is.

    Returns ``(B, A, mom)`` with the momentum updated as SPEC says (no metric on it).
    """
    lam = prox if relative else lr * prox
    eye = torch.eye(g.shape[1], dtype=torch.float64)
    terms, coeffs = [(b, a), (g, eye)], [1.0, -lr * (1.0 - dampening) * step_scale]
    if mom is not None:
        terms.append(mom)
        coeffs.append(-lr * momentum * step_scale)
    averaged = metric is not None and precondition_momentum
    pre = [False, True] + [not averaged] * (len(terms) - 2) if metric is not None else None
    new_b, new_a = explicit_lorsum(terms, coeffs, (b, a), iters=iters, prox=lam, metric=metric,
                                   precondition=pre, start=start, relative=relative)
    if mom is not None:
        mom = explicit_lorsum([mom, (g, eye)], [momentum, 1.0 - dampening], mom, iters=iters, prox=lam,
                              start=mom_start or start, relative=relative, metric=metric if averaged else None,
                              precondition=[False, True] if averaged else None)
    return new_b, new_a, mom


def matrix_power_psd(d, damping, power, relative=False):
    """``(d + damping)^power`` of a vector (elementwise) or a symmetric PSD matrix (eigh); with
    ``relative`` the damping is times the mean of the vector (the trace / size of the matrix)."""
    d = d.double()
    if relative:
        damping = damping * (d.mean() if d.dim() == 1 else d.diagonal().mean()).item()
    if d.dim() == 1:
        return (d + damping) ** power
    evals, evecs = torch.linalg.eigh(d)
    return (evecs * (evals + damping) ** power) @ evecs.T


def explicit_svd_step(b, a, step_matrix, r):
    """Balanced rank-r factors of ``B A - step_matrix`` (SVDLoRA)."""
    u, s, vh = torch.linalg.svd(b.double() @ a.double() - step_matrix, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]
