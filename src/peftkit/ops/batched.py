"""Per-row adapter routing ("mixed batches"): row ``b`` of a batch gets the low-rank update of adapter
``index[b]`` (``-1``: no adapter), computed for all rows at once.

Conventions: ``x: (N, *, in)``, ``result: (N, *, out)`` with the batch in dim 0; ``index: (N,)`` long with values
in ``[-1, U)``; adapter ``u`` has ``A_u: (r_u, in)``, ``B_u: (out, r_u)`` and a scalar ``scaling_u``. Stacks pad
every adapter to ``R = max r_u`` with zeros (exact: padded rows of A meet padded columns of B) and fold the
scaling into B, which is stored transposed so batched products read it contiguously, with one extra all-zero
slot at the end for ``-1`` rows: ``A_stack: (U + 1, R, in)``, ``Bt_stack: (U + 1, R, out)`` (``Bt_stack[u] =
scaling_u * B_u.T``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: up to this many contiguous runs of equal adapters, rows are handled as slices (no gather, no copies)
MAX_SLICED_RUNS = 4


def mixed_lowrank_reference(
    result: torch.Tensor,
    x: torch.Tensor,
    index: Sequence[int],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
) -> torch.Tensor:
    """Plain row-by-row loop: ``out[b] = result[b] + s_u * x[b] @ A_u.T @ B_u.T`` with ``u = index[b]``."""
    rows = []
    for b, u in enumerate(index):
        row = result[b]
        if u >= 0:
            row = row + (x[b].to(As[u].dtype) @ As[u].t() @ Bs[u].t()) * scalings[u]
        rows.append(row.to(result.dtype))
    return torch.stack(rows)


def stack_adapters(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], scalings: Sequence[float | torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_stack (U+1, R, in), Bt_stack (U+1, R, out))``: zero-padded to the largest rank, ``B`` transposed and
    pre-scaled, and a final all-zero slot for rows without adapter."""
    rank = max(A.shape[0] for A in As)
    first = As[0]
    scale = torch.stack([torch.as_tensor(s, dtype=first.dtype, device=first.device) for s in scalings])
    scale = torch.cat([scale, scale.new_zeros(1)]).view(-1, 1, 1)
    if all(A.shape[0] == rank for A in As):  # the common case: two stack kernels, no Python loop of copies
        A_stack = torch.stack([*As, first.new_zeros(first.shape)])
        Bt_stack = torch.stack([*(B.t() for B in Bs), Bs[0].new_zeros(Bs[0].shape).t()]) * scale
        return A_stack, Bt_stack
    A_stack = first.new_zeros((len(As) + 1, rank, first.shape[1]))
    Bt_stack = first.new_zeros((len(As) + 1, rank, Bs[0].shape[0]))
    for u, (A, B) in enumerate(zip(As, Bs)):
        A_stack[u, : A.shape[0]] = A
        Bt_stack[u, : B.shape[1]] = B.t()
    return A_stack, Bt_stack * scale


def contiguous_runs(index: Sequence[int]) -> list[tuple[int, int, int]]:
    """``[(start, stop, u), ...]``: maximal runs of equal values in ``index``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for b in range(1, len(index) + 1):
        if b == len(index) or index[b] != index[start]:
            runs.append((start, b, index[start]))
            start = b
    return runs


def add_mixed_lowrank_(
    result: torch.Tensor,
    x: torch.Tensor,
    index: torch.Tensor,
    runs: list[tuple[int, int, int]],
    A_stack: torch.Tensor,
    Bt_stack: torch.Tensor,
    rows_are_slots: bool = False,
) -> torch.Tensor:
    """Add each row's low-rank update into ``result`` in place and return it.

    With few contiguous runs (rows sorted by adapter, or a single adapter), each run is a slice of the batch and
    gets two matmuls with no copies. Otherwise the per-row ``A``/``B`` are gathered and applied with two batched
    matmuls (``bmm``/``baddbmm_``) — no Python loop over adapters. ``rows_are_slots``: the caller guarantees
    ``index == arange(N)`` (every row its own adapter, in stack order), so the per-row weights are slices of the
    stacks and nothing is gathered.
    """
    n, width = x.shape[0], x.shape[-1]
    x = x.to(A_stack.dtype)
    if len(runs) <= MAX_SLICED_RUNS:
        for start, stop, u in runs:
            if u < 0:
                continue
            part = x[start:stop].reshape(-1, width) @ A_stack[u].t()  # (rows*T, R)
            result[start:stop].view(-1, result.shape[-1]).addmm_(part, Bt_stack[u])
        return result
    if rows_are_slots:
        A_rows, Bt_rows = A_stack[:n], Bt_stack[:n]
    else:
        slots = torch.where(index < 0, A_stack.shape[0] - 1, index)
        A_rows, Bt_rows = A_stack[slots], Bt_stack[slots]
    hidden = torch.bmm(x.reshape(n, -1, width), A_rows.transpose(1, 2))  # (N, T, R)
    result.view(n, -1, result.shape[-1]).baddbmm_(hidden, Bt_rows)
    return result


def mixed_embedding_hidden(x: torch.Tensor, index: torch.Tensor, tables: torch.Tensor, **embedding_kwargs: object
                           ) -> torch.Tensor:
    """Rank-space embedding lookup with a per-row table: ``hidden[b] = tables[index[b]][x[b]]``.

    ``x: (N, *) long``, ``tables: (U + 1, num_embeddings, R)`` (last slot zeros) -> ``(N, *, R)``; one
    ``F.embedding`` over the flattened tables.
    """
    slots = torch.where(index < 0, tables.shape[0] - 1, index)
    offsets = (slots * tables.shape[1]).view(-1, *([1] * (x.dim() - 1)))
    flat = tables.reshape(-1, tables.shape[-1])
    return torch.nn.functional.embedding(x + offsets, flat, **embedding_kwargs)  # type: ignore[arg-type]
