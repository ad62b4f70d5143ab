"""Contrastive losses over all data-parallel ranks, with empty (E_max-padded) slots masked out.

`contrastive_loss` is the one used in training. It never builds the global [B, B] logits, nor
even one rank's [b, B] row of them: each rank keeps its own image rows, text embeddings travel
around the ring of ranks one block at a time, and each image x text block is computed once in the
cluster, `chunk_size` columns at a time. What a rank holds is O(b·D + b·chunk_size):

    forward   running log-sum-exp per image row (stays home) and per text column (travels with
              its block, lagging one step behind it, and arrives home complete)
    backward  recomputes every chunk from those statistics; the gradient of a text block travels
              with it and arrives home summed over all ranks

Invalid slots are compacted away before anything is computed, so garbage (even NaN) in an empty
slot can never reach the loss or a gradient, and a rank with no valid slot takes part normally.

`reference_contrastive_loss` is the plain full-matrix form, kept as the reference the chunked
loss must equal (tests, benchmarks).

Gradient convention (the one DeepSpeed's data-parallel averaging needs): every rank returns the
same global loss L; the gradient it returns for its own embeddings is W · dL/d(embeddings) and for
the temperature and bias it is dL/d(scale), dL/d(bias). After DeepSpeed sums the parameter
gradients over ranks and divides by W, every shared parameter holds exactly dL/dθ. Dividing by W
twice (open_clip issue #616) or not at all are the usual mistakes; tests/test_loss_distributed.py
checks the averaged gradients against a single-process run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from navit_clip import dist

KINDS = ("softmax", "sigmoid")
DEFAULT_CHUNK_SIZE = 1024
DEFAULT_MAX_LOGIT_SCALE = 100.0
_TAG_BLOCK, _TAG_STATS, _TAG_GRAD = 71, 72, 73


def _check_inputs(image_emb: torch.Tensor, text_emb: torch.Tensor, valid: torch.Tensor,
                  logit_bias: torch.Tensor | None, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown contrastive loss kind {kind!r} (softmax or sigmoid)")
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid loss needs a logit_bias")
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings must both be [n, D], got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if valid.dtype != torch.bool or valid.shape != image_emb.shape[:1]:
        raise ValueError(f"valid must be a bool tensor of shape [{image_emb.shape[0]}], got "
                         f"{valid.dtype} {tuple(valid.shape)}")


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, valid: torch.Tensor,
                     logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, *,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, kind: str = "softmax",
                     max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE) -> torch.Tensor:
    """Loss of all ranks' valid pairs, equal in value and (after data-parallel averaging) in
    gradients to `reference_contrastive_loss` on the concatenation of every rank's valid pairs.

    Per-rank inputs: image_emb, text_emb [n, D] (any float dtype; computed in fp32), valid [n]
    bool, the same n on every rank. logit_scale is the multiplier (not its log), clamped at
    max_logit_scale; logit_bias is required by the sigmoid kind and ignored by softmax (a shift of
    all logits cancels there). chunk_size bounds the columns of logits held at once."""
    _check_inputs(image_emb, text_emb, valid, logit_bias, kind)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = logit_scale.clamp(max=max_logit_scale)
    bias = logit_bias if kind == "sigmoid" else None
    return _ChunkedContrastive.apply(image_emb, text_emb, valid, scale, bias, chunk_size, kind)


def _logits(x_scaled: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = x_scaled @ y.T
    return logits if bias is None else logits.add_(bias)


def _logsumexp_(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Log-sum-exp over a non-empty dim, overwriting logits: one [c, cols] buffer, not three."""
    top = logits.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    return logits.sub_(top).exp_().sum(dim=dim, keepdim=True).log_().add_(top).squeeze(dim)


def _chunks(length: int, chunk_size: int):
    return (slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size))


class _ChunkedContrastive(torch.autograd.Function):
    """Ring-chunked softmax or sigmoid contrastive loss; see the module docstring."""

    @staticmethod
    def forward(ctx, image, text, valid, scale, bias, chunk_size, kind):  # type: ignore[override]
        world, rank = dist.world_size(), dist.rank()
        counts = dist.all_gather_ints(int(valid.sum()))
        total = sum(counts)
        if total == 0:
            raise ValueError("no valid image-text pair in the batch on any rank")
        block_rows = max(counts)
        index = valid.nonzero().squeeze(1)
        x = image.detach()[index].float()  # this rank's valid image rows [c, D]
        own = text.new_zeros((block_rows, text.shape[1]), dtype=torch.float32)  # its text block
        own[:len(index)] = text.detach()[index].float()
        s = scale.detach().float().reshape(())
        b = bias.detach().float().reshape(()) if bias is not None else None
        x_scaled = s * x

        row_lse = x.new_full((len(x),), float("-inf"))
        pair_sum = x.new_zeros((), dtype=torch.float64)
        block, col_lse, pending = own, None, []
        for step in range(world):
            owner = (rank - step) % world
            incoming = RingStep.receive(row_lse.new_empty(block_rows), _TAG_STATS, kind == "softmax" and step > 0)
            prefetch = RingStep.shift(block, _TAG_BLOCK, step < world - 1)
            col_lse = x.new_full((block_rows,), float("-inf"))
            for cols in _chunks(counts[owner] if len(x) else 0, chunk_size):  # a rank may hold no rows
                logits = _logits(x_scaled, block[cols], b)  # [c, cols]
                if kind == "softmax":
                    row_lse = torch.logaddexp(row_lse, _logsumexp_(logits.clone(), dim=1))
                    col_lse[cols] = _logsumexp_(logits, dim=0)
                else:
                    pair_sum += F.softplus(logits).sum(dtype=torch.float64)
            if kind == "softmax" and world > 1:
                if incoming is not None:
                    col_lse = torch.logaddexp(incoming.wait(), col_lse)
                pending.append(RingStep.send(col_lse, _TAG_STATS))
            if prefetch is not None:
                block = prefetch.wait()
        if kind == "softmax" and world > 1:
            col_lse = RingStep.receive(row_lse.new_empty(block_rows), _TAG_STATS, True).wait()
        for transfer in pending:
            transfer.wait()

        c = len(x)
        positives = (x_scaled * own[:c]).sum(-1) + (0.0 if b is None else b)
        if kind == "softmax":
            local = (row_lse - positives).sum(dtype=torch.float64) + (col_lse[:c] - positives).sum(dtype=torch.float64)
            denominator = 2 * total
        else:
            local = pair_sum - positives.sum(dtype=torch.float64)
            denominator = total
        loss = dist.all_reduce_sum(local.reshape(1)).reshape(()) / denominator

        ctx.save_for_backward(x, own, row_lse, col_lse, index, s, b)
        ctx.meta = dict(counts=counts, total=total, chunk_size=chunk_size, kind=kind, n=image.shape[0],
                        dtypes=(image.dtype, text.dtype, scale.dtype, None if bias is None else bias.dtype),
                        shapes=(scale.shape, None if bias is None else bias.shape))
        return loss.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        x, own, row_lse, col_lse, index, s, b = ctx.saved_tensors
        meta = ctx.meta
        counts, total, kind, chunk_size = meta["counts"], meta["total"], meta["kind"], meta["chunk_size"]
        world, rank = dist.world_size(), dist.rank()
        c, dim = x.shape
        # a text block travels with its column statistics: [rows, D | lse]
        block = torch.cat([own, torch.where(torch.isfinite(col_lse), col_lse, 0.0)[:, None]], dim=1)
        x_scaled = s * x
        g_y = torch.zeros_like(x)  # Σ_j dL/dlogits_ij · y_j: gives both dL/dx (times s) and dL/ds
        grad_b = x.new_zeros((), dtype=torch.float64)
        norm = 1.0 / (2 * total) if kind == "softmax" else 1.0 / total
        pending, grad_own = [], None
        for step in range(world):
            owner = (rank - step) % world
            incoming = RingStep.receive(own, _TAG_GRAD, step > 0)
            prefetch = RingStep.shift(block, _TAG_BLOCK, step < world - 1)
            grad_block = torch.zeros_like(own)
            for cols in _chunks(counts[owner] if len(x) else 0, chunk_size):  # a rank may hold no rows
                y, y_lse = block[cols, :dim], block[cols, dim]
                logits = _logits(x_scaled, y, b)
                if kind == "softmax":  # dL/dlogits = (softmax over the row + softmax over the column) / 2B
                    g = (logits - row_lse[:, None]).exp_().add_(logits.sub_(y_lse[None, :]).exp_())
                else:  # dL/dlogits = sigmoid(logits) / B
                    g = logits.sigmoid_()
                    if b is not None:
                        grad_b += g.sum(dtype=torch.float64) * norm
                g_y.addmm_(g, y, alpha=norm)
                grad_block[cols] = (g.T @ x_scaled).mul_(norm)
            if incoming is not None:
                grad_block += incoming.wait()
            if world > 1:
                pending.append(RingStep.send(grad_block, _TAG_GRAD))
            else:
                grad_own = grad_block
            if prefetch is not None:
                block = prefetch.wait()
        if world > 1:
            grad_own = RingStep.receive(own, _TAG_GRAD, True).wait()
        for transfer in pending:
            transfer.wait()

        # the positive pairs: -1 on the diagonal of dL/dlogits (norm from each side for softmax)
        diagonal = 2 * norm if kind == "softmax" else norm
        g_y -= diagonal * own[:c]
        grad_own[:c] -= diagonal * x_scaled
        grad_x = s * g_y
        grad_s = (x * g_y).sum(dtype=torch.float64)  # Σ_ij dL/dlogits_ij · x_i·y_j
        grad_b -= diagonal * c
        scalars = dist.all_reduce_sum(torch.stack([grad_s, grad_b]))

        image_dtype, text_dtype, scale_dtype, bias_dtype = meta["dtypes"]
        scale_shape, bias_shape = meta["shapes"]
        # W · dL/d(own embeddings): see the module docstring
        factor = grad_loss.float() * world
        grad_image = x.new_zeros((meta["n"], dim))
        grad_image[index] = grad_x * factor
        grad_text = x.new_zeros((meta["n"], dim))
        grad_text[index] = grad_own[:c] * factor
        grad_scale = (scalars[0] * grad_loss).to(scale_dtype).reshape(scale_shape)
        grad_bias = None if bias_dtype is None else (scalars[1] * grad_loss).to(bias_dtype).reshape(bias_shape)
        return grad_image.to(image_dtype), grad_text.to(text_dtype), None, grad_scale, grad_bias, None, None


class RingStep:
    """Thin helpers over dist.RingTransfer that do nothing on a single rank or when not needed."""

    @staticmethod
    def shift(tensor: torch.Tensor, tag: int, needed: bool = True) -> dist.RingTransfer | None:
        return dist.RingTransfer(tensor, tensor, tag=tag) if needed and dist.world_size() > 1 else None

    @staticmethod
    def receive(like: torch.Tensor, tag: int, needed: bool = True) -> dist.RingTransfer | None:
        return dist.RingTransfer(None, like, tag=tag) if needed and dist.world_size() > 1 else None

    @staticmethod
    def send(tensor: torch.Tensor, tag: int) -> dist.RingTransfer:
        return dist.RingTransfer(tensor, None, tag=tag)


# ---------------------------------------------------------------------------------------------
# The plain full-matrix reference.

def masked_logits(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, logit_scale: torch.Tensor,
                  logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """[B_valid, B_valid] image-to-text logits of the valid pairs (rows: images, columns: texts)."""
    image, text = image[valid], text[valid]
    logits = logit_scale * image @ text.T
    return logits + logit_bias if logit_bias is not None else logits


def softmax_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: each image picks its caption and each caption its image."""
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise loss: every pair is an independent binary decision, normalized by B."""
    signs = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(logits)


def reference_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, valid: torch.Tensor,
                               logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, *,
                               kind: str = "softmax") -> torch.Tensor:
    """The same loss computed the plain way: every rank gathers all embeddings (with autograd) and
    builds the [B_valid, B_valid] logits. Exact, simple, O(B²) memory per rank."""
    _check_inputs(image_emb, text_emb, valid, logit_bias, kind)
    image = dist.all_gather_with_grad(image_emb)
    text = dist.all_gather_with_grad(text_emb)
    valid = dist.all_gather_no_grad(valid)
    if not bool(valid.any()):
        raise ValueError("no valid image-text pair in the batch on any rank")
    logits = masked_logits(image, text, valid, logit_scale, logit_bias)
    return softmax_loss(logits) if kind == "softmax" else sigmoid_loss(logits)
