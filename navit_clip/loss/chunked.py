"""The ring-chunked contrastive loss as one autograd function: the ring (ring.py) moves the text
blocks, a term (terms.py) supplies the math of the loss kind, and this module does what both
kinds share: compacting the valid slots, the logits of each chunk, the positive pairs, the bias
and temperature gradients and the data-parallel gradient convention (see the package docstring).
"""

from __future__ import annotations

import torch

from navit_clip import dist
from navit_clip.loss.ring import TAG_GRAD, TAG_STATS, Carried, ring_chunks
from navit_clip.loss.terms import TERMS, Term


def _logits(x_scaled: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = x_scaled @ y.T
    return logits if bias is None else logits.add_(bias)


def _compact(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, block_rows: int):
    """This rank's valid image rows [c, D] and its text block [block_rows, D] (valid rows first,
    zeros after), in fp32 and detached, with the slot index of each valid row."""
    index = valid.nonzero().squeeze(1)
    x = image.detach()[index].float()
    own = text.new_zeros((block_rows, text.shape[1]), dtype=torch.float32)
    own[:len(index)] = text.detach()[index].float()
    return x, own, index


def _forward_sums(term: Term, x_scaled: torch.Tensor, own: torch.Tensor, counts: list[int],
                  bias: torch.Tensor | None, chunk_size: int) -> torch.Tensor | None:
    """One turn of the ring folding every chunk of logits into the term's statistics; the
    complete column statistics of this rank's own block (None if the term keeps none)."""
    carried = None
    if term.column_start is not None:
        carried = Carried(x_scaled.new_empty(len(own)), term.column_start, term.merge_columns, TAG_STATS)
    for chunk in ring_chunks(own, counts, chunk_size, len(x_scaled) > 0, carried):
        columns = term.add_chunk(_logits(x_scaled, chunk.columns, bias))
        if chunk.carried is not None:
            chunk.carried.copy_(columns)
    return None if carried is None else carried.home


def _backward_sums(term: Term, x_scaled: torch.Tensor, own: torch.Tensor, stats: tuple, counts: list[int],
                   bias: torch.Tensor | None, chunk_size: int, norm: float):
    """One turn of the ring recomputing every chunk's dL/dlogits, without the positive-pair
    diagonal: Σ_j dL/dlogits_ij · y_j per image row, the gradient of this rank's own text block
    summed over all ranks, and Σ dL/dlogits (the bias gradient). stats: the term's (row, column)
    statistics from the forward."""
    rows, columns = stats
    dim = x_scaled.shape[1]
    g_y = torch.zeros_like(x_scaled)
    grad_b = x_scaled.new_zeros((), dtype=torch.float64)
    carried = Carried(own, 0.0, lambda arrived, mine: mine.add_(arrived), TAG_GRAD)
    for chunk in ring_chunks(_travelling_block(own, columns), counts, chunk_size, len(x_scaled) > 0, carried):
        y, y_stats = chunk.columns[:, :dim], chunk.columns[:, dim]
        g = term.logit_grad(_logits(x_scaled, y, bias), rows, y_stats)
        if bias is not None:
            grad_b += g.sum(dtype=torch.float64) * norm
        g_y.addmm_(g, y, alpha=norm)
        chunk.carried.copy_((g.T @ x_scaled).mul_(norm))
    return g_y, carried.home, grad_b


def _travelling_block(own: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """A text block as it travels in the backward: [rows, D | column statistic], one layout for
    every kind (0 where a term keeps no column statistic, or for a column that holds no text)."""
    if columns is None:
        columns = own.new_zeros(len(own))
    return torch.cat([own, torch.where(torch.isfinite(columns), columns, 0.0)[:, None]], dim=1)


class ChunkedContrastive(torch.autograd.Function):
    """Ring-chunked contrastive loss of a term; see the package docstring."""

    @staticmethod
    def forward(ctx, image, text, valid, scale, bias, chunk_size, kind):  # type: ignore[override]
        counts = dist.all_gather_ints(int(valid.sum()))
        total = sum(counts)
        if total == 0:
            raise ValueError("no valid image-text pair in the batch on any rank")
        x, own, index = _compact(image, text, valid, max(counts))
        s = scale.detach().float().reshape(())
        b = bias.detach().float().reshape(()) if bias is not None else None
        x_scaled = s * x
        term = TERMS[kind](x)
        columns = _forward_sums(term, x_scaled, own, counts, b, chunk_size)

        c = len(x)
        positives = (x_scaled * own[:c]).sum(-1) + (0.0 if b is None else b)
        local = term.local_sum(positives, None if columns is None else columns[:c])
        loss = dist.all_reduce_sum(local.reshape(1)).reshape(()) / (term.sides * total)

        ctx.save_for_backward(x, own, term.row_stats(), columns, index, s, b)
        ctx.meta = dict(counts=counts, total=total, chunk_size=chunk_size, kind=kind, n=image.shape[0],
                        dtypes=(image.dtype, text.dtype, scale.dtype, None if bias is None else bias.dtype),
                        shapes=(scale.shape, None if bias is None else bias.shape))
        return loss.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        x, own, rows, columns, index, s, b = ctx.saved_tensors
        meta = ctx.meta
        term = TERMS[meta["kind"]]
        c = len(x)
        x_scaled = s * x
        norm = 1.0 / (term.sides * meta["total"])
        g_y, grad_own, grad_b = _backward_sums(term, x_scaled, own, (rows, columns), meta["counts"], b,
                                               meta["chunk_size"], norm)
        # the positive pairs: -1 on the diagonal of dL/dlogits, counted once per side
        diagonal = term.sides * norm
        g_y -= diagonal * own[:c]
        grad_own[:c] -= diagonal * x_scaled
        grad_s = (x * g_y).sum(dtype=torch.float64)  # Σ_ij dL/dlogits_ij · x_i·y_j
        grad_b -= diagonal * c
        scalars = dist.all_reduce_sum(torch.stack([grad_s, grad_b]))
        return _gradients_out(meta, grad_loss, index, s * g_y, grad_own[:c], scalars)


def _gradients_out(meta: dict, grad_loss: torch.Tensor, index: torch.Tensor, grad_x: torch.Tensor,
                   grad_y: torch.Tensor, scalars: torch.Tensor) -> tuple:
    """The gradients in forward's argument order, scattered back to the slots, in the inputs'
    dtypes: W · dL/d(own embeddings) and dL/d(scale), dL/d(bias) (see the package docstring)."""
    image_dtype, text_dtype, scale_dtype, bias_dtype = meta["dtypes"]
    scale_shape, bias_shape = meta["shapes"]
    factor = grad_loss.float() * dist.world_size()
    grad_image = grad_x.new_zeros((meta["n"], grad_x.shape[1]))
    grad_image[index] = grad_x * factor
    grad_text = grad_x.new_zeros((meta["n"], grad_x.shape[1]))
    grad_text[index] = grad_y * factor
    grad_scale = (scalars[0] * grad_loss).to(scale_dtype).reshape(scale_shape)
    grad_bias = None if bias_dtype is None else (scalars[1] * grad_loss).to(bias_dtype).reshape(bias_shape)
    return grad_image.to(image_dtype), grad_text.to(text_dtype), None, grad_scale, grad_bias, None, None
