"""The flat batch of the LSTM rule: all coordinates of all tensors, cut into chunks of at most ``chunk_size`` rows.

This is the multi-tensor idea of ``torch.optim``'s ``foreach`` paths: a large tensor is split across chunks, small
tensors (biases, norms) share one, so a model with hundreds of small tensors costs a few LSTM calls rather than
hundreds, and a chunk's working set stays in cache.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["plan", "run_without_autograd", "run_differentiable"]

Piece = tuple[int, slice]  # (tensor index, rows of that tensor)
StepFunction = Callable[[int], Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]]


def plan(sizes: Sequence[int], chunk_size: int) -> list[list[Piece]]:
    """Split tensors of ``sizes`` coordinates into chunks of at most ``chunk_size`` rows.

    A tensor of at least ``chunk_size // 4`` coordinates gets chunks of its own, each a single piece whose rows
    are views (no copy in, no copy out); smaller tensors are packed together, several pieces per chunk.

    Example:
        >>> [[(i, rows.start, rows.stop) for i, rows in chunk] for chunk in plan([40, 3, 3], chunk_size=16)]
        [[(0, 0, 16)], [(0, 16, 32)], [(0, 32, 40)], [(1, 0, 3), (2, 0, 3)]]
    """
    chunks: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    for index, n in enumerate(sizes):
        if n >= max(chunk_size // 4, 1):
            chunks.extend([(index, slice(s, min(s + chunk_size, n)))] for s in range(0, n, chunk_size))
            continue
        if n and filled + n > chunk_size:
            chunks.append(current)
            current, filled = [], 0
        if n:
            current.append((index, slice(0, n)))
            filled += n
    if current:
        chunks.append(current)
    return chunks


def _chunk_results(
    step: StepFunction, chunk_size: int, dtype: torch.dtype, features: list[Tensor], hs: list[Tensor],
    cs: list[Tensor], finite: list[Tensor | None],
) -> Iterator[tuple[int, slice, Tensor, Tensor, Tensor]]:
    """Run ``step(rows)`` on every chunk; yield ``(tensor, rows, raw output, new h, new c)`` for each piece (states
    ``(layers, rows, hidden)``), with non-finite coordinates (false in ``finite``) given their old state."""
    for pieces in plan([len(x) for x in features], chunk_size):
        if len(pieces) == 1:
            i, rows = pieces[0]
            if rows.stop - rows.start == len(features[i]):  # the whole tensor: no slice node for autograd
                inputs = features[i], hs[i].to(dtype), cs[i].to(dtype)
            else:
                inputs = features[i][rows], hs[i][:, rows].to(dtype), cs[i][:, rows].to(dtype)
        else:
            inputs = (
                torch.cat([features[i][rows] for i, rows in pieces]),
                torch.cat([hs[i][:, rows].to(dtype) for i, rows in pieces], dim=1),
                torch.cat([cs[i][:, rows].to(dtype) for i, rows in pieces], dim=1),
            )
        raw, new_h, new_c = step(len(inputs[0]))(*inputs)
        offset = 0
        for i, rows in pieces:
            part = slice(offset, offset + rows.stop - rows.start)
            offset = part.stop
            whole = part.start == 0 and part.stop == len(raw)  # no slice node for autograd
            r, h_new, c_new = (raw, new_h, new_c) if whole else (raw[part], new_h[:, part], new_c[:, part])
            mask = finite[i]
            if mask is not None:
                keep = mask[rows].unsqueeze(-1)
                h_new = torch.where(keep, h_new, hs[i][:, rows])
                c_new = torch.where(keep, c_new, cs[i][:, rows])
            yield i, rows, r, h_new, c_new


def run_without_autograd(
    step: StepFunction, chunk_size: int, dtype: torch.dtype, outputs: int, features: list[Tensor],
    hs: list[Tensor], cs: list[Tensor], finite: list[Tensor | None], inplace: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Raw outputs and new states, each chunk's result copied once into the new state: into ``hs``/``cs``
    themselves where ``inplace``, else into fresh tensors."""
    raws = [x.new_empty(len(x), outputs) for x in features]
    new_hs = hs if inplace else [torch.empty_like(h) for h in hs]
    new_cs = cs if inplace else [torch.empty_like(c) for c in cs]
    for i, rows, r, h_new, c_new in _chunk_results(step, chunk_size, dtype, features, hs, cs, finite):
        raws[i][rows] = r
        new_hs[i][:, rows] = h_new
        new_cs[i][:, rows] = c_new
    return raws, new_hs, new_cs


def run_differentiable(
    step: StepFunction, chunk_size: int, dtype: torch.dtype, outputs: int, features: list[Tensor],
    hs: list[Tensor], cs: list[Tensor], finite: list[Tensor | None],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The same with autograd (the unroll engine): pieces are concatenated, never written in place."""
    parts: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in features]
    for i, _, r, h_new, c_new in _chunk_results(step, chunk_size, dtype, features, hs, cs, finite):
        parts[i].append((r, h_new, c_new))
    raws, new_hs, new_cs = [], [], []
    for x, h, c, pieces in zip(features, hs, cs, parts):
        if not pieces:  # an empty tensor
            raws.append(x.new_zeros(0, outputs))
            new_hs.append(h)
            new_cs.append(c)
            continue
        if len(pieces) == 1:  # the usual case: no concatenation copy (torch.cat copies even one tensor)
            raw, h_out, c_out = pieces[0]
        else:
            raw = torch.cat([p[0] for p in pieces])
            h_out, c_out = (torch.cat([p[k] for p in pieces], dim=1) for k in (1, 2))
        raws.append(raw)
        new_hs.append(h_out.to(h.dtype))
        new_cs.append(c_out.to(c.dtype))
    return raws, new_hs, new_cs
