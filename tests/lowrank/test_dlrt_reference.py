"""Independent references for the DLRT integrator (Schotthöfer et al. 2022, Algorithm 1) on small networks.

The references never use the library's thin-gradient formulas nor its QR bases: the K- and L-gradients come
from autograd on ``K ↦ L(K Vᵀ)`` and ``L ↦ L(U Lᵀ)`` of a dense network, the subspaces enter through
orthogonal projectors (pseudo-inverses), and the truncation through the SVD of the dense n × m result.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.lowrank import DLRT, LowRankConv2d, LowRankLinear, low_rank_layers


def projector(A):
    """The orthogonal projector onto the column span of ``A`` (any rank), by the pseudo-inverse."""
    return A @ torch.linalg.pinv(A)


def best_rank(W, tol, r_min=1, r_max=None):
    """Best approximation of ``W`` at the rank the relative criterion ‖σ_{r+1:}‖ ≤ ϑ‖σ‖ picks, within bounds."""
    P, sigma, Qh = torch.linalg.svd(W, full_matrices=False)
    total = sigma.norm()
    r = next(r for r in range(len(sigma) + 1) if sigma[r:].norm() <= tol * total)
    r = max(r, 1, r_min)
    if r_max is not None:
        r = min(r, r_max)
    return P[:, :r] @ torch.diag(sigma[:r]) @ Qh[:r], r


def kl_gradients(loss_of, weights, factors):
    """∇_K and ∇_L of every layer by autograd on K ↦ L(K Vᵀ) and L ↦ L(U Lᵀ), the other layers dense."""
    grads = []
    for i, (U, S, V) in enumerate(factors):
        K = (U @ S).requires_grad_()
        (gK,) = torch.autograd.grad(loss_of([K @ V.T if j == i else W for j, W in enumerate(weights)]), K)
        L = (V @ S.T).requires_grad_()
        (gL,) = torch.autograd.grad(loss_of([U @ L.T if j == i else W for j, W in enumerate(weights)]), L)
        grads.append((gK, gL))
    return grads


def dlrt_reference(loss_fn, weights, biases, factors, lr, tol, r_min=1, r_max=None):
    """One DLRT step of every layer at once, written with projectors; returns the new dense weights and biases.

    ``loss_fn(weights, biases)``: the loss of the network with dense ``n × m`` weights.
    """
    loss_of = lambda ws: loss_fn(ws, biases)                                   # noqa: E731
    P_cols, P_rows = [], []
    for (U, S, V), (gK, gL) in zip(factors, kl_gradients(loss_of, weights, factors)):
        K1, L1 = U @ S - lr * gK, V @ S.T - lr * gL                            # K- and L-steps
        if tol is None:
            P_cols.append(projector(K1))
            P_rows.append(projector(L1))
        else:                                                                  # basis augmentation [K¹, U], [L¹, V]
            P_cols.append(projector(torch.cat([K1, U], 1)))
            P_rows.append(projector(torch.cat([L1, V], 1)))
    # The Galerkin start S̃ = M S Nᵀ is the old matrix seen through the new bases.
    tilde = [Pc @ W @ Pr for Pc, W, Pr in zip(P_cols, weights, P_rows)]
    leaves = [W.clone().requires_grad_() for W in tilde] + [b.clone().requires_grad_() for b in biases]
    grads = torch.autograd.grad(loss_fn(leaves[:len(tilde)], leaves[len(tilde):]), leaves)   # the S-step pass
    new_weights = [W - lr * Pc @ G @ Pr for W, Pc, G, Pr in zip(tilde, P_cols, grads, P_rows)]
    new_biases = [b - lr * g for b, g in zip(biases, grads[len(tilde):])]
    ranks = [min(U.shape[1], W.shape[0], W.shape[1]) for (U, _, _), W in zip(factors, weights)]
    if tol is not None:
        truncated = [best_rank(W, tol, r_min, r_max) for W in new_weights]
        new_weights, ranks = [W for W, _ in truncated], [r for _, r in truncated]
    return new_weights, new_biases, ranks


def run_one_step(model, loss, lr, tol, **kwargs):
    dlrt = DLRT(model, lr=lr, tol=tol, **kwargs)
    dlrt.zero_grad()
    first = loss()
    first.backward()
    second = dlrt.step(loss)
    return first.detach(), second


def assert_orthonormal_factors(layer):
    eye = torch.eye(layer.rank, dtype=layer.U.dtype)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, rtol=0, atol=1e-10)


def two_linear_layers(seed=0):
    """8 → 6 (rank 2) → tanh → 3 (rank 2, so the augmented column basis has only n = 3 < 2r columns), biases."""
    torch.manual_seed(seed)
    model = nn.Sequential(LowRankLinear(8, 6, 2), nn.Tanh(), LowRankLinear(6, 3, 2)).double()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.uniform_(-0.5, 0.5)
            layer.S.copy_(layer.S + 0.3 * torch.randn(2, 2, dtype=torch.float64))    # a full core, as in training
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=generator)
    return model, x, y


@pytest.mark.parametrize("tol, r_min, r_max", [(None, 1, None), (0.05, 1, None), (0.3, 1, None), (0.4, 1, None),
                                              (0.4, 3, None), (0.05, 1, 2)])
def test_one_step_of_a_two_layer_network_matches_the_projector_form_of_algorithm_1(tol, r_min, r_max):
    """Both layers step at once: K-, L-steps from one pass, S-step pass in both augmented bases, biases by the
    S-pass gradient, truncation = best approximation at the rank of the relative Frobenius criterion."""
    model, x, y = two_linear_layers()
    lr = 0.7
    layers = [model[0], model[2]]
    factors = [tuple(t.detach().clone() for t in (layer.U, layer.S, layer.V)) for layer in layers]
    weights = [U @ S @ V.T for U, S, V in factors]
    biases = [layer.bias.detach().clone() for layer in layers]

    def loss_fn(ws, bs):
        return F.cross_entropy(torch.tanh(x @ ws[0].T + bs[0]) @ ws[1].T + bs[1], y)

    kwargs = {} if tol is None else {"r_min": r_min, "r_max": r_max}
    expected_w, expected_b, expected_r = dlrt_reference(loss_fn, weights, biases, factors, lr, tol, r_min, r_max)
    run_one_step(model, lambda: F.cross_entropy(model(x), y), lr, tol, **kwargs)
    for layer, W, b, r in zip(layers, expected_w, expected_b, expected_r):
        torch.testing.assert_close(layer.matrix().detach(), W, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(layer.bias.detach(), b, rtol=1e-9, atol=1e-11)
        assert layer.rank == r and layer.S.shape == (r, r)
        assert_orthonormal_factors(layer)
        if tol is not None:                                  # the truncated core is diagonal, σ₁ ≥ σ₂ ≥ ... ≥ 0
            sigma = torch.diagonal(layer.S.detach())
            assert torch.equal(layer.S.detach(), torch.diag(sigma))
            assert (sigma[:-1] >= sigma[1:]).all() and (sigma >= 0).all()
    if tol == 0.4 and r_min == 1:
        assert expected_r != [2, 2]                          # the truncation changed a rank in this case


@pytest.mark.parametrize("tol", [None, 0.1])
def test_one_step_of_a_conv_then_linear_network_matches_the_projector_form(tol):
    """A convolution (weight n × c·k_h·k_w) and a linear layer, both low rank: the same reference."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1, stride=2)
    model = nn.Sequential(LowRankConv2d(conv, 2), nn.Tanh(), nn.Flatten(), LowRankLinear(4 * 3 * 3, 3, 2)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 6, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    layers = [model[0], model[3]]
    factors = [tuple(t.detach().clone() for t in (layer.U, layer.S, layer.V)) for layer in layers]
    weights = [U @ S @ V.T for U, S, V in factors]
    biases = [layer.bias.detach().clone() for layer in layers]

    def loss_fn(ws, bs):
        h = torch.tanh(F.conv2d(x, ws[0].reshape(4, 2, 3, 3), bs[0], stride=2, padding=1))
        return F.mse_loss(h.flatten(1) @ ws[1].T + bs[1], y)

    lr = 0.5
    expected_w, expected_b, expected_r = dlrt_reference(loss_fn, weights, biases, factors, lr, tol)
    run_one_step(model, lambda: F.mse_loss(model(x), y), lr, tol)
    for layer, W, b, r in zip(layers, expected_w, expected_b, expected_r):
        torch.testing.assert_close(layer.matrix().detach(), W, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(layer.bias.detach(), b, rtol=1e-9, atol=1e-11)
        assert layer.rank == r
        assert_orthonormal_factors(layer)


def test_the_rank_adaptive_s_step_pass_sees_the_weights_of_the_first_pass():
    """Û S̃ V̂ᵀ = Û Ûᵀ U S Vᵀ V̂ V̂ᵀ = U S Vᵀ, since U and V lie in the augmented bases (Algorithm 1: S̃ = M S Nᵀ is
    the old weight), so rank-adaptive DLRT takes ∇_S L from the first pass; at fixed rank the network changes."""
    for tol in (0.1, None):
        model, x, y = two_linear_layers()
        layers = [model[0], model[2]]
        dlrt = DLRT(model, lr=0.7, tol=tol)
        dlrt.zero_grad()
        first = F.cross_entropy(model(x), y)
        first.backward()
        for name, layer in zip(("0", "2"), layers):
            dlrt._basis_update(name, layer)
        augmented = F.cross_entropy(model(x), y)
        if tol is None:
            assert abs(first - augmented) > 1e-6
        else:
            torch.testing.assert_close(augmented, first, rtol=1e-12, atol=1e-12)


def dense_gradient(dense, passes):
    """∂L/∂W of the dense layer ``dense`` by autograd, summed over ``passes``, as an ``n × m`` matrix."""
    dense.weight.grad = None
    for loss_of in passes:
        loss_of(dense).backward()
    return dense.weight.grad.reshape(dense.weight.shape[0], -1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_galerkin_gradient_is_the_projected_dense_gradient_of_the_kept_passes(kind):
    """galerkin_gradient() = U'ᵀ (∂L/∂W) V' for any bases U', V' set after the passes, with ∂L/∂W by autograd on a
    dense copy: over two accumulated backward passes, one of which uses the layer twice (its two inputs and output
    gradients are both kept). Under kl_gradients=False (a fixed-rank S-step pass) nothing is kept."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = LowRankLinear(7, 5, 2).double()
        x = torch.randn(6, 7, dtype=torch.float64)
        twice = lambda f: f(torch.tanh(f(x) @ torch.ones(5, 7, dtype=torch.float64) / 5))    # noqa: E731
    else:
        layer = LowRankConv2d(nn.Conv2d(3, 4, 3, padding=1, stride=2), 2).double()
        x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
        twice = lambda f: f(torch.tanh(f(x)).repeat(1, 1, 2, 2)[:, :3, :7, :7])               # noqa: E731
    dense = layer.to_dense()
    passes = [lambda f: f(x).square().sum(), lambda f: twice(f).sin().sum()]
    layer.keeps_signals = True
    for loss_of in passes:
        loss_of(layer).backward()
    assert len(layer.signals) == 3
    n, m = layer.dense_shape
    G = dense_gradient(dense, passes)
    U1, V1 = (torch.linalg.qr(torch.randn(size, 4, dtype=torch.float64)).Q for size in (n, m))
    layer.set_factors(U1, torch.zeros(4, 4), V1)
    torch.testing.assert_close(layer.galerkin_gradient(), U1.T @ G @ V1, rtol=1e-10, atol=1e-12)
    layer.kl_gradients = False
    passes[0](layer).backward()                                 # U.grad was None: the old signals are cleared
    assert not layer.signals


def test_bases_stay_orthonormal_over_many_rank_adaptive_steps_of_a_conv_network():
    """Float32, 30 steps, ranks changing, a convolution whose 2r exceeds its n: UᵀU = VᵀV = I throughout."""
    torch.manual_seed(0)
    model = nn.Sequential(LowRankConv2d(nn.Conv2d(3, 4, 3, padding=1), 3), nn.ReLU(), nn.Flatten(),
                          LowRankLinear(4 * 5 * 5, 6, 5), nn.ReLU(), nn.Linear(6, 3))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 5, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    dlrt = DLRT(model, lr=0.3, tol=0.35)
    seen = set()
    for _ in range(30):
        dlrt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dlrt.step(lambda: F.cross_entropy(model(x), y))
        for layer in low_rank_layers(model).values():
            eye = torch.eye(layer.rank)
            assert torch.linalg.matrix_norm(layer.U.T @ layer.U - eye) < 1e-5
            assert torch.linalg.matrix_norm(layer.V.T @ layer.V - eye) < 1e-5
        seen.add(tuple(dlrt.ranks().values()))
    assert len(seen) > 1                                      # the ranks did change


@pytest.mark.parametrize("tol", [None, 0.1, 0.5])                  # 0.1: the rank grows 3 → 4; 0.5: falls to 2
def test_adam_first_moments_are_the_projected_moving_average_of_the_dense_gradient(tol):
    """The docstring's claim that the moments are carried into the new bases (m ← Cᵀ m D), checked in the
    ambient space: with A_K = m_K Vᵀ, A_L = m_L Uᵀ, A_S = U m_S Vᵀ and G the dense gradient,

        A_K ← (β₁ A_K + (1 − β₁) G P_V) P_V',   A_L ← (β₁ A_L + (1 − β₁) Gᵀ P_U) P_U',
        A_S ← P_U' (β₁ A_S + (1 − β₁) G̃) P_V',

    with P the projector onto the current (unprimed) and the next (primed) bases, and G̃ the S-step pass's
    gradient (P_U' ⊂ P_Û). Uses only the layer's factors before and after each step.
    """
    torch.manual_seed(0)
    layer = LowRankLinear(7, 6, 3, bias=False).double()
    model = nn.Sequential(layer)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 7, generator=generator, dtype=torch.float64), torch.randn(20, 6, generator=generator,
                                                                                  dtype=torch.float64)
    beta1 = 0.8
    dlrt = DLRT(model, lr=0.05, tol=tol, betas=(beta1, 0.9))

    def grad_at(W):
        W = W.detach().clone().requires_grad_()
        return torch.autograd.grad(F.mse_loss(x @ W.T, y), W)[0]

    A_K = torch.zeros(6, 7, dtype=torch.float64)
    A_L = torch.zeros(7, 6, dtype=torch.float64)
    A_S = torch.zeros(6, 7, dtype=torch.float64)
    for step in range(1, 5):
        U, S, V = (t.detach().clone() for t in (layer.U, layer.S, layer.V))
        G = grad_at(U @ S @ V.T)
        loss = lambda: F.mse_loss(model(x), y)                              # noqa: E731
        dlrt.zero_grad()
        loss().backward()
        # The S-step pass's weights are Û S̃ V̂ᵀ; keep them to take G̃ there.
        captured = {}
        closure = lambda: (captured.setdefault("W", layer.matrix().detach().clone()), loss())[1]   # noqa: E731
        dlrt.step(closure)
        # The S-step's network Û S̃ V̂ᵀ: the closure's at fixed rank; with tol the first pass's (the closure unused).
        G_tilde = grad_at(captured["W"]) if tol is None else G
        U1, V1 = layer.U.detach(), layer.V.detach()
        PU, PV, PU1, PV1 = (Q @ Q.T for Q in (U, V, U1, V1))
        A_K = (beta1 * A_K + (1 - beta1) * G @ PV) @ PV1
        A_L = (beta1 * A_L + (1 - beta1) * G.T @ PU) @ PU1
        A_S = PU1 @ (beta1 * A_S + (1 - beta1) * G_tilde) @ PV1
        state = dlrt.state["0"]
        assert state["step"] == step
        torch.testing.assert_close(state["K"][0], A_K @ V1, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(state["L"][0], A_L @ U1, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(state["S"][0], U1.T @ A_S @ V1, rtol=1e-9, atol=1e-12)
        assert all((state[key][1] >= 0).all() for key in "KLS")


def test_adam_in_the_augmented_basis_takes_the_papers_order_k_then_u():
    """Rank-adaptive DLRT with β₁ = β₂ = 0: the S-step's Adam direction g / (|g| + ε) is taken entry by entry in the
    augmented basis, so the basis itself matters, not only the space it spans. Reference, by hand, as in Schotthöfer
    et al. (2022), algorithm 2: Û = qr([K¹, U₀]).Q, V̂ = qr([L¹, V₀]).Q, S̃ = ÛᵀU₀ S₀ V₀ᵀV̂, then
    S¹ = S̃ − λ·sign-like(Ûᵀ ∇W V̂) at Û S̃ V̂ᵀ; tol = 0 keeps the whole rank-4 core. The order [U₀, K¹] spans the same
    space and gives a different step (about 5e-4 here)."""
    torch.manual_seed(0)
    layer = LowRankLinear(7, 6, 2, bias=False).double()
    model = nn.Sequential(layer)
    x, y = torch.randn(10, 7, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    U, S, V = (t.detach().clone() for t in (layer.U, layer.S, layer.V))

    def gradient_at(weight):
        weight = weight.detach().clone().requires_grad_()
        return torch.autograd.grad(F.mse_loss(x @ weight.T, y), weight)[0]

    lr, eps = 0.01, 1e-8
    sign_like = lambda g: g / (g.abs() + eps)                                   # noqa: E731
    G = gradient_at(U @ S @ V.T)
    K1, L1 = U @ S - lr * sign_like(G @ V), V @ S.T - lr * sign_like(G.T @ U)
    U_hat = torch.linalg.qr(torch.cat([K1, U], dim=1)).Q
    V_hat = torch.linalg.qr(torch.cat([L1, V], dim=1)).Q
    S_tilde = U_hat.T @ U @ S @ V.T @ V_hat
    S1 = S_tilde - lr * sign_like(U_hat.T @ gradient_at(U_hat @ S_tilde @ V_hat.T) @ V_hat)
    dlrt = DLRT(model, lr=lr, tol=0.0, betas=(0.0, 0.0), eps=eps)
    dlrt.zero_grad()
    F.mse_loss(model(x), y).backward()
    dlrt.step(lambda: F.mse_loss(model(x), y))
    assert layer.rank == 4
    torch.testing.assert_close(layer.U @ layer.S @ layer.V.T, U_hat @ S1 @ V_hat.T, rtol=1e-9, atol=1e-12)


def test_adam_with_zero_betas_is_a_sign_like_step_in_the_current_bases():
    """β₁ = β₂ = 0: every direction is g / (|g| + ε), whatever the history; the first K-step checked by hand."""
    torch.manual_seed(0)
    layer = LowRankLinear(7, 6, 2, bias=False).double()
    model = nn.Sequential(layer)
    x, y = torch.randn(10, 7, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    U, S, V = (t.detach().clone() for t in (layer.U, layer.S, layer.V))
    W = (U @ S @ V.T).requires_grad_()
    G = torch.autograd.grad(F.mse_loss(x @ W.T, y), W)[0]
    lr, eps = 0.01, 1e-8
    K1 = U @ S - lr * (G @ V) / ((G @ V).abs() + eps)
    L1 = V @ S.T - lr * (G.T @ U) / ((G.T @ U).abs() + eps)
    dlrt = DLRT(model, lr=lr, betas=(0.0, 0.0), eps=eps)                      # fixed rank: Û = orth(K¹)
    dlrt.zero_grad()
    F.mse_loss(model(x), y).backward()
    dlrt.step(lambda: F.mse_loss(model(x), y))
    torch.testing.assert_close(layer.U @ layer.U.T, projector(K1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.V @ layer.V.T, projector(L1), rtol=1e-9, atol=1e-12)
