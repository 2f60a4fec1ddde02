"""The LM head applied to final hidden states a chunk of positions at a time, so that no [positions, vocab]
tensor is ever built for a whole sequence (Gemma's vocabulary is 262,144: fp32 logits of one 2048-token
sequence are 2 GB). Only a handful of [chunk, vocab] fp32 temporaries exist at the peak
(≈ 6 · chunk · vocab · 4 bytes), independent of the batch and the sequence length. Used by the Fisher
(per-token log-likelihoods, label sampling), heal's distillation and the evaluation's likelihoods.
Measured peaks: docs/benchmarks.md, section "Fisher memory".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LogitHead:
    """What turns final hidden states into logits: z = softcap(h Wᵀ + b), softcap(x) = c · tanh(x / c)."""

    weight: torch.Tensor  # [vocab, hidden]
    bias: torch.Tensor | None
    softcap: float | None  # Gemma's final_logit_softcapping; None for most models

    @classmethod
    def of(cls, causal_lm: nn.Module) -> LogitHead:
        head = causal_lm.get_output_embeddings()
        softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
        return cls(head.weight, head.bias, softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> fp32 [n, vocab]; the matmul runs in the weight's dtype (bf16 on GPU)."""
        z = nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def backward_through(self, grad_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """d loss / d hidden, given d loss / d logits [n, vocab] and the (capped) logits."""
        if self.softcap is not None:
            grad_logits = grad_logits * (1 - (logits / self.softcap) ** 2)  # d/dx c·tanh(x/c) = 1 − tanh²
        return grad_logits.to(self.weight.dtype) @ self.weight


class _ChunkedTokenLogLikelihood(torch.autograd.Function):
    """log p(target_n | h_n) for each of N positions, `chunk` positions at a time. Each output depends on its
    own position only, so d out_n / d h_n [N, hidden] is all of the Jacobian: it is computed in the forward,
    chunk by chunk, and kept (small); the backward only scales it by the incoming gradient [N]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, head: LogitHead, chunk: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            z = head.logits(hidden[rows])  # [n, vocab] fp32
            picked = targets[rows].unsqueeze(1)  # [n, 1]
            log_normalizer = torch.logsumexp(z, dim=-1, keepdim=True)  # [n, 1]
            out[rows] = (z.gather(1, picked) - log_normalizer).squeeze(1)
            if grad is not None:
                # d log softmax(z)_y / d z = onehot(y) − softmax(z), built in place in one [n, vocab] buffer
                grad_z = (z - log_normalizer).exp_().neg_()
                grad_z.scatter_add_(1, picked, torch.ones_like(picked, dtype=grad_z.dtype))
                grad[rows] = head.backward_through(grad_z, z).to(grad.dtype)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad_out.unsqueeze(1).to(grad.dtype) * grad, None, None, None


def token_log_likelihoods(hidden: torch.Tensor, targets: torch.Tensor, head: LogitHead,
                          chunk_size: int) -> torch.Tensor:
    """log p(target | hidden) per position: hidden [N, hidden], targets [N] (valid token ids) -> fp32 [N].
    Differentiable w.r.t. `hidden`; the head is treated as frozen (the Fisher tracks decoder Linears only)."""
    return _ChunkedTokenLogLikelihood.apply(hidden, targets, head, chunk_size)


@torch.no_grad()
def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of softmax(logits) by inverse CDF: logits [n, vocab] fp32, uniforms [n] in [0, 1) -> [n].

    Each row's draw depends on its own uniform only, so drawing a sequence in chunks of positions gives the
    same tokens as drawing it at once, on any device (torch.multinomial's stream use depends on the shape)."""
    cdf = torch.softmax(logits, dim=-1).cumsum_(dim=-1)  # [n, vocab]
    total = cdf[:, -1:]  # ≈ 1; the draw is scaled by it so rounding in the cumsum cannot push it past the end
    # Strictly below the total: the first index whose cdf exceeds it has positive probability (never a trailing 0).
    below_total = torch.nextafter(total, torch.zeros_like(total))
    threshold = torch.minimum(uniforms.unsqueeze(1).to(cdf.dtype) * total, below_total)
    return torch.searchsorted(cdf, threshold, right=True).squeeze(1)


@torch.no_grad()
def sample_tokens_chunked(hidden: torch.Tensor, uniforms: torch.Tensor, head: LogitHead,
                          chunk_size: int) -> torch.Tensor:
    """`sample_tokens` of head.logits(hidden) [N, hidden], `chunk_size` positions at a time -> [N]."""
    if hidden.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=hidden.device)
    return torch.cat([sample_tokens(head.logits(hidden[start:start + chunk_size]), uniforms[start:start + chunk_size])
                      for start in range(0, hidden.shape[0], chunk_size)])


class HiddenCapture:
    """A forward hook on a causal LM's backbone (`base_model`) that keeps its last_hidden_state [B, L, H]."""

    def __init__(self, causal_lm: nn.Module):
        self.hidden: torch.Tensor | None = None
        self._handle = causal_lm.base_model.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.hidden = output.last_hidden_state

    def take(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the backbone's forward hook saw no forward: the hidden states to distill are missing")
        return hidden
