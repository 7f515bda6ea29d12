"""Jacobian directions (pipeline/jacobian.py) against the explicit Jacobian of a tiny U-Net."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from conftest import make_tiny_unet
from pipeline import HSpaceModel
from pipeline.errors import ConvergenceError, InputError
from pipeline.methods import jacobian as jac

SEED, STEP, K = 0, 0, 4  # at this point the tiny U-Net's spectrum has usable gaps (s5/s4 ~ 0.93)
TOL = {"subspace": 1e-4, "sequential": 1e-4, "deflation": 1e-4, "auto": 1e-5}  # float32 floor ~5e-7


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster, and robust to a busy machine


@pytest.fixture(scope="module")
def model():
    return HSpaceModel(make_tiny_unet(), DDIMScheduler(), num_inference_steps=5, eta=1.0, device="cpu")


@pytest.fixture(scope="module")
def solved(model):
    """jacobian_directions(model, SEED, STEP, K, method=...) for each method, computed once."""
    cache = {}

    def get(method, **kw):
        key = (method, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = jac.jacobian_directions(model, SEED, STEP, K, method=method, tol=TOL[method], max_iter=2000, **kw)
        return cache[key]

    return get


def explicit_J(model, x_t, step, h):
    """Independent reference: torch.autograd.functional.jacobian of eps w.r.t. h, (d_out, d_in)."""
    C, H, W = model.h_shape

    def g(hv):
        with torch.enable_grad():
            return model.eps_given_h(x_t[None], step, hv.reshape(1, C, H, W)).reshape(-1)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.jacobian(g, h.reshape(-1).clone()).double()


@pytest.fixture(scope="module")
def point(model):
    """x_t, h_t of the sample's own trajectory, J and its SVD (U, S, Vh)."""
    out = model.sample([SEED], return_latents=True)
    x_t, h = out.latents[0, STEP], out.h[0, STEP]
    J = explicit_J(model, x_t, STEP, h)
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    return {"x_t": x_t, "h": h, "J": J, "U": U, "S": S, "Vh": Vh}


def max_angle(V: torch.Tensor, W: torch.Tensor) -> float:
    """Largest principal angle (rad) between the row spaces of V and W (k, d)."""
    Qv = torch.linalg.qr(V.double().reshape(len(V), -1).T)[0]
    Qw = torch.linalg.qr(W.double().reshape(len(W), -1).T)[0]
    return float(torch.arccos(torch.linalg.svdvals(Qv.T @ Qw).clamp(max=1.0)).max())


def check_against_svd(res, J, S, Vh, k=K, left=True):
    s = res.singular_values.double()
    V = res.directions.reshape(k, -1).double()
    assert torch.allclose(s, S[:k], rtol=1e-3, atol=0), (s, S[:k])
    assert max_angle(V, Vh[:k]) < 1e-2
    assert torch.allclose(V @ V.T, torch.eye(k, dtype=V.dtype), atol=1e-4)
    if left:  # J v = s u
        Uk = res.left.reshape(k, -1).double()
        err = (V @ J.T - s[:, None] * Uk).norm(dim=1) / s
        assert float(err.max()) < 2e-2


# ------------------------------------------------------------------ products
def test_jvp_vjp_match_explicit_jacobian(model, point):
    f = jac.eps_function(model, point["x_t"], STEP)
    h, J = point["h"].reshape(-1), point["J"]
    V = torch.randn(5, h.numel(), generator=torch.Generator().manual_seed(1))
    U = torch.randn(5, J.shape[0], generator=torch.Generator().manual_seed(2))
    JV, JTU = V.double() @ J.T, U.double() @ J

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    assert rel(jac.jvp(f, h, V), JV) < 1e-4
    assert rel(jac.vjp(f, h, U), JTU) < 1e-4
    for mode in ("double_backward", "forward"):
        lin = jac.Linearization(f, h, width=2, jvp_mode=mode)  # 5 rows: chunks of 2, last one padded
        assert rel(lin.jvp(V), JV) < 1e-4
        assert rel(lin.vjp(U), JTU) < 1e-4
        assert lin.vectors == {"jvp": 5, "vjp": 5}
        assert lin.passes["backward"] >= 3 and lin.passes["forward"] == 1
    assert torch.allclose(jac.explicit_jacobian(f, h, width=100).double(), J, atol=1e-5)


# ------------------------------------------------------------------ solvers on a known linear map
@pytest.mark.parametrize("method,kw", [("subspace", {}), ("subspace", {"oversample": 3}), ("sequential", {"block": 2}),
                                       ("deflation", {}), ("krylov", {}), ("krylov", {"block": 1}),
                                       ("krylov", {"block": 3, "max_basis": 9}),  # thick restarts
                                       ("subspace", {"products": "linearized"})])
def test_solvers_on_linear_map(method, kw):
    g = torch.Generator().manual_seed(0)
    d_in, d_out, k = 60, 40, 5
    Uo = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
    Vo = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    s = 0.8 ** torch.arange(d_out, dtype=torch.float64)
    A = (Uo * s) @ Vo[:, :d_out].T                           # (d_out, d_in), singular values 0.8^i
    f = lambda H: H @ A.T.float()                            # noqa: E731
    res = jac.top_singular(f, torch.zeros(d_in), k, method=method, tol=1e-6, max_iter=2000, **kw)
    assert res.converged
    assert torch.allclose(res.singular_values.double(), s[:k], rtol=1e-4)
    cos = (res.V.double() @ Vo[:, :k]).diagonal().abs()       # each vector, not just the subspace
    assert float(cos.min()) > 1 - 1e-4
    assert torch.allclose(res.U.double().abs(), (res.V.double() @ A.T / s[:k, None]).abs(), atol=1e-3)
    idx = res.V.abs().argmax(dim=1)                           # sign convention
    assert (res.V.gather(1, idx[:, None]) > 0).all()


def close_pair_map(d_in: int = 60, d_out: int = 40):
    """A linear map whose 4th and 5th singular values are 0.993 apart (as on the tiny U-Net where Alg. 2
    with block 2 returned a 4th vector at |cos| 0.80 after 300 iterations): f, right singular vectors, s."""
    g = torch.Generator().manual_seed(1)
    Uo = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
    Vo = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    s = 0.9 ** torch.arange(d_out, dtype=torch.float64)
    s[4] = 0.993 * s[3]
    A = (Uo * s) @ Vo[:, :d_out].T
    return (lambda H: H @ A.T.float()), Vo, s


def test_a_method_that_stops_short_falls_back_or_fails_never_returns_silently():
    f, Vo, s = close_pair_map()
    kw = dict(method="sequential", block=2, tol=1e-4, max_iter=30)
    raw = jac.top_singular(f, torch.zeros(60), 4, unconverged="return", **kw)
    assert not raw.converged and raw.fallback is None and float(raw.residuals.max()) > 1e-4  # the old behaviour
    with pytest.raises(ConvergenceError,
                       match=r"sequential stopped short of tol=1.0e-04 after \d+ iterations: "
                             r"vector \d of 4 has relative residual"):
        jac.top_singular(f, torch.zeros(60), 4, unconverged="error", **kw)
    res = jac.top_singular(f, torch.zeros(60), 4, **kw)  # default: fall back to the default method
    assert res.converged and res.fallback == "krylov" and (res.residuals < 1e-4).all() and res.iterations > 30
    cos = (res.V.double() @ Vo[:, :4]).diagonal().abs()
    assert float(cos.min()) > 1 - 1e-3, cos  # the 4th vector too (it is the one next to the close pair)
    torch.testing.assert_close(res.singular_values.double(), s[:4], rtol=1e-4, atol=0)
    with pytest.raises(ConvergenceError, match="krylov stopped short"):  # the fallback has the same budget
        jac.top_singular(f, torch.zeros(60), 4, method="sequential", block=2, tol=1e-4, max_iter=1)
    with pytest.raises(InputError, match="unconverged"):
        jac.top_singular(f, torch.zeros(60), 4, unconverged="warn")


# ------------------------------------------------------------------ the paper's methods, the best, the baseline
@pytest.mark.parametrize("method,kw", [("subspace", {}), ("sequential", {"block": 2}), ("auto", {}), ("deflation", {})])
def test_methods_match_svd(model, point, solved, method, kw):
    res = solved(method, **kw)
    assert res.converged and res.directions.shape == (K, *model.h_shape) and res.left.shape == (K, 3, 16, 16)
    check_against_svd(res, point["J"], point["S"], point["Vh"])


def test_alg2_and_best_agree_with_alg1(model, solved):
    a1, best = solved("subspace"), solved("auto")
    a2 = solved("sequential", block=2)
    assert a2.method == "sequential" and best.method == "krylov"
    for other in (a2, best, solved("deflation")):
        assert torch.allclose(a1.singular_values, other.singular_values, rtol=1e-3)
        assert max_angle(a1.directions.reshape(K, -1), other.directions.reshape(K, -1)) < 1e-2
    # block= alone selects Alg. 2
    assert jac.jacobian_directions(model, SEED, STEP, 2, block=1, tol=1e-3, max_iter=5,
                                   unconverged="return").method == "sequential"
    # the best method needs far fewer products than the paper's
    assert best.vectors["jvp"] * 2 < a1.vectors["jvp"]


def test_mask_matches_masked_svd(model, point):
    mask = torch.full((16, 16), 0.1)
    mask[2:9, 4:14] = 1.0
    Jm = mask.reshape(1, -1).repeat(3, 1).reshape(-1, 1).double() * point["J"]  # diag(mask) J
    _, Sm, Vhm = torch.linalg.svd(Jm, full_matrices=False)
    res = jac.jacobian_directions(model, SEED, STEP, 2, mask=mask, tol=1e-5)
    check_against_svd(res, Jm, Sm, Vhm, k=2)
    a1 = jac.jacobian_directions(model, SEED, STEP, 2, mask=mask[None].expand(3, -1, -1), method="subspace", tol=1e-4,
                                 max_iter=2000)
    check_against_svd(a1, Jm, Sm, Vhm, k=2)
    assert max_angle(res.directions.reshape(2, -1), point["Vh"][:2]) > 0.1  # the mask changes the answer


# ------------------------------------------------------------------ the sample's own trajectory
def test_stochastic_sample_uses_its_own_trajectory(model):
    step = 3
    own = model.sample([5], return_latents=True)
    latents, hs = jac.sample_trajectory(model, 5)
    assert torch.equal(latents[step], own.latents[0, step]) and torch.equal(hs[step], own.h[0, step])
    other = model.sample(x_T=own.x_T, noise=torch.zeros(1, 5, 3, 16, 16), return_latents=True)
    assert not torch.allclose(other.latents[0, step], own.latents[0, step], atol=1e-3)  # eta=1: noise matters
    no_latents = model.sample([5])                                     # a SampleOutput: seeds give the noise
    assert torch.equal(jac.sample_trajectory(model, no_latents)[0][step], own.latents[0, step])
    given = {"x_T": own.x_T[0], "noise": model.step_noise([5])}         # a dict with x_T and noise
    assert torch.equal(jac.sample_trajectory(model, given)[0][step], own.latents[0, step])
    with pytest.raises(InputError, match="own trajectory"):
        jac.sample_trajectory(model, {"x_T": own.x_T})
    J = explicit_J(model, own.latents[0, step], step, own.h[0, step])
    S = torch.linalg.svdvals(J)
    res = jac.jacobian_directions(model, 5, step, 3, tol=1e-5)
    assert torch.allclose(res.singular_values.double(), S[:3], rtol=1e-3)
    S_other = torch.linalg.svdvals(explicit_J(model, other.latents[0, step], step, other.h[0, step]))
    assert not torch.allclose(res.singular_values.double(), S_other[:3], rtol=1e-3)


def test_deterministic_signs_and_inference_mode(model):
    a = jac.jacobian_directions(model, SEED, STEP, 3, tol=1e-5)
    V = a.directions.reshape(3, -1)
    assert (V.gather(1, V.abs().argmax(dim=1, keepdim=True)) > 0).all()
    with torch.inference_mode():                   # as in Lightning predict
        b = jac.jacobian_directions(model, SEED, STEP, 3, tol=1e-5)
    assert torch.allclose(a.directions, b.directions, atol=1e-5)
    with torch.no_grad():
        c = jac.jacobian_directions(model, SEED, STEP, 3, tol=1e-5, block=2, max_iter=2000)
    assert torch.allclose(a.singular_values, c.singular_values, rtol=1e-3)


# ------------------------------------------------------------------ every step, global at index
def test_all_steps_and_global_at_index(model):
    T, k = model.num_steps, 2
    res = jac.jacobian_directions_all_steps(model, SEED, k, tol=1e-5)
    C, H, W = model.h_shape
    assert res.directions.shape == (T, k, C, H, W) and res.singular_values.shape == (T, k)
    assert res.converged.all() and res.steps == list(range(T))
    latents, hs = jac.sample_trajectory(model, SEED)
    for s in (1, 4):
        S = torch.linalg.svdvals(explicit_J(model, latents[s], s, hs[s]))
        assert torch.allclose(res.singular_values[s].double(), S[:k], rtol=1e-3)
    dots = (res.directions[1:] * res.directions[:-1]).sum(dim=(2, 3, 4))
    assert (dots >= 0).all()                       # aligned with the previous step
    tau, idx = 2, 1
    delta = jac.global_at_index(res.directions, res.singular_values, tau, idx)
    assert delta.shape == (T, C, H, W)
    for i in range(T):
        assert torch.allclose(delta[i], res.singular_values[i, idx] * res.directions[tau, idx])
    every = jac.global_at_index(res.directions, res.singular_values, tau)
    assert every.shape == (k, T, C, H, W) and torch.allclose(every[idx], delta)


# ------------------------------------------------------------------ bad inputs
def test_bad_inputs(model):
    T, d = model.num_steps, math.prod(model.h_shape)
    with pytest.raises(InputError, match="step 5 out of range"):
        jac.jacobian_directions(model, SEED, T, 2)
    with pytest.raises(InputError, match="out of range"):
        jac.jacobian_directions(model, SEED, -1, 2)
    with pytest.raises(InputError, match="too large"):
        jac.jacobian_directions(model, SEED, 0, d + 1)
    with pytest.raises(InputError, match="too large"):
        jac.jacobian_directions(model, SEED, 0, 3 * 16 * 16 + 1)  # more than d_out
    with pytest.raises(InputError, match="positive int"):
        jac.jacobian_directions(model, SEED, 0, 0)
    with pytest.raises(InputError, match="mask has shape"):
        jac.jacobian_directions(model, SEED, 0, 2, mask=torch.ones(8, 8))
    with pytest.raises(InputError, match="mask has shape"):
        jac.jacobian_directions(model, SEED, 0, 2, mask=torch.ones(2, 16, 16))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        jac.jacobian_directions(model, SEED, 0, 2, mask=2 * torch.ones(16, 16))
    with pytest.raises(InputError, match="all zero"):
        jac.jacobian_directions(model, SEED, 0, 2, mask=torch.zeros(16, 16))
    with pytest.raises(InputError, match="unknown method"):
        jac.jacobian_directions(model, SEED, 0, 2, method="lanczos9")
    with pytest.raises(InputError, match="block"):
        jac.jacobian_directions(model, SEED, 0, 2, block=3)
    with pytest.raises(InputError, match="one sample"):
        jac.jacobian_directions(model, model.sample([1, 2], return_latents=True), 0, 2)
    with pytest.raises(InputError, match="init"):
        jac.jacobian_directions(model, SEED, 0, 2, init=torch.ones(2, 7))
    with pytest.raises(InputError, match="tau"):
        jac.global_at_index(torch.zeros(T, 2, *model.h_shape), torch.zeros(T, 2), T, 0)
