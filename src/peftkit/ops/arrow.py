"""Arrow routing among a library of LoRA experts (pure tensor math; the layer glue is ``methods/lora/arrow.py``).

Arrow (https://huggingface.co/papers/2405.11157) combines ``E`` task LoRAs per token. Each expert ``e`` of a layer
(``A_e: (r, in)``, ``B_e: (out, r)``, scaling ``s_e``) has a *prototype* ``p_e: (in,)``, the top right singular
vector of ``ΔW_e = B_e @ A_e`` (sign arbitrary). For a token ``x: (in,)``:

    sim_e   = |<x, p_e>|
    coeff   = softmax over the top_k experts of sim / temperature (0 for the others)
    delta   = Σ_e coeff_e · s_e · B_e A_e x

This is the reference's ``ArrowLoraLinearLayer`` (``peft/tuners/lora/arrow.py``) operation for operation, so the
outputs agree to rounding: the prototype comes from the same power iteration (15 steps from a Gaussian start drawn
from a generator seeded with ``rng_seed``, or from the global RNG when it is None), not from an exact SVD.
:func:`arrow_delta_reference` is the plain per-token, per-expert loop the fast version is tested against.
"""

from __future__ import annotations

import torch

#: power-iteration steps and the norm guard, as the reference
POWER_ITERS = 15
POWER_EPS = 1e-8


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor, rng_seed: int | None = None,
                              iters: int = POWER_ITERS, eps: float = POWER_EPS) -> torch.Tensor:
    """The dominant right singular vector ``(in,)`` (fp32) of ``ΔW = B @ A`` for ``A: (r, in)``, ``B: (out, r)``,
    by power iteration on ``v -> Aᵀ (BᵀB) (A v)`` without forming ``ΔW``. The start vector is drawn by
    ``torch.randn`` from a generator on ``A``'s device seeded with ``rng_seed`` (the global RNG when None), so a
    seeded call matches the reference bit for bit up to matmul rounding."""
    A32, B32 = A.detach().to(torch.float32), B.detach().to(torch.float32)
    C = B32.T @ B32  # (r, r)
    gen = None
    if rng_seed is not None:
        gen = torch.Generator(device=A32.device.type)
        gen.manual_seed(int(rng_seed))
    v = torch.randn(A32.size(1), dtype=A32.dtype, device=A32.device, generator=gen)
    v = v / (v.norm() + eps)
    for _ in range(iters):
        w = A32.T @ (C @ (A32 @ v))
        v = w / (w.norm() + eps)
    return v


def arrow_coefficients(tokens: torch.Tensor, prototypes: torch.Tensor, top_k: int,
                       temperature: float) -> torch.Tensor:
    """``(t, E)`` routing weights for ``tokens: (t, in)`` and ``prototypes: (E, in)``: a softmax of
    ``|tokens @ prototypesᵀ| / temperature`` over each token's ``top_k`` experts, exactly 0 elsewhere."""
    sim = torch.abs(tokens @ prototypes.T)  # (t, E), sign-agnostic
    top_v, idx = torch.topk(sim, top_k, dim=1)
    full = tokens.new_full(sim.shape, float("-inf"))
    full.scatter_(1, idx, top_v)
    return torch.softmax(full / temperature, dim=1)


def arrow_delta(tokens: torch.Tensor, coeff: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor,
                scales: torch.Tensor) -> torch.Tensor:
    """``(t, out)``: ``Σ_e coeff[:, e] · scales[e] · tokens @ A_eᵀ @ B_eᵀ`` for ``tokens: (t, in)``,
    ``coeff: (t, E)``, ``A_stack: (E, r, in)``, ``B_stack: (E, out, r)``, ``scales: (E,)``."""
    z = torch.einsum("tf, erf -> ter", tokens, A_stack)  # (t, E, r)
    y = torch.einsum("ter, eor -> teo", z, B_stack)  # (t, E, out)
    y = y * scales.view(1, -1, 1)
    return torch.einsum("te, teo -> to", coeff, y)


def arrow_delta_reference(tokens: torch.Tensor, prototypes: torch.Tensor, As: list[torch.Tensor],
                          Bs: list[torch.Tensor], scales: list[float], top_k: int,
                          temperature: float) -> torch.Tensor:
    """Plain loop version of ``arrow_delta(tokens, arrow_coefficients(...), ...)``: per token, rank the experts by
    ``|<x, p_e>|``, softmax the ``top_k`` best over ``/ temperature`` and sum their scaled updates. ``(t, out)``."""
    rows = []
    for x in tokens:
        sims = [abs(float(x @ p)) for p in prototypes]
        best = sorted(range(len(sims)), key=lambda e: -sims[e])[:top_k]
        weights = torch.softmax(torch.tensor([sims[e] / temperature for e in best], dtype=torch.float64), 0)
        out = torch.zeros(Bs[0].shape[0], dtype=torch.float64)
        for w, e in zip(weights, best):
            out += float(w) * scales[e] * (Bs[e].double() @ (As[e].double() @ x.double()))
        rows.append(out)
    return torch.stack(rows).to(tokens.dtype)
