"""Cross entropy over vocab-parallel logits, in fp32, without gathering the full logits.

Each TP rank holds logits[..., v_start:v_end]. The loss needs three numbers per token from
the whole vocabulary, each one all-reduce of a [s, b] tensor: the max (for stability), the
target's logit (only the owner rank has it; the others add 0) and the sum of exponentials
(plus, with label smoothing, the sum of the logits).

`vocab_size` (the real vocabulary) excludes the padding rows: the vocabulary is padded to a
multiple of 128 x TP, so without this the softmax would run over a different number of ids
for every TP size and the same model would give a different loss in another layout.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.parallel import state
from megalite.parallel.tensor import all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, vocab_size):
        # logits [s, b, v/tp] (any float dtype), target [s, b] -> loss [s, b] fp32
        st = state.get()
        vocab_local = logits.shape[-1]
        start = st.tp_rank * vocab_local
        # ids [start + real, ...) of my slice are padding
        real = min(max(vocab_size - start, 0), vocab_local)
        logits = logits.float()
        if real < vocab_local:
            logits = logits.clone()  # .float() may have returned the input
            logits[..., real:] = float("-inf")  # exp(-inf) = 0: padding drops out

        logits_max = logits.max(dim=-1).values  # [s, b]
        all_reduce(logits_max, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)  # [s, b, v/tp]

        outside = (target < start) | (target >= start + vocab_local)
        local_target = (target - start).masked_fill(outside, 0)  # [s, b]
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        all_reduce(target_logit)

        if label_smoothing > 0:
            sum_shifted = shifted[..., :real].sum(dim=-1)  # for mean log-prob below
            all_reduce(sum_shifted)
        exp = shifted.exp_()  # reuse the buffer
        sum_exp = exp.sum(dim=-1)
        all_reduce(sum_exp)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit  # [s, b]
        softmax = exp.div_(sum_exp.unsqueeze(-1))  # [s, b, v/tp]

        if label_smoothing > 0:
            # Smoothed loss = (1-a) * nll + a * mean over the real vocab of -log p.
            mean_log_prob = sum_shifted / vocab_size - log_sum_exp
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_prob
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.label_smoothing, ctx.vocab_size, ctx.real = label_smoothing, vocab_size, real
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        a = ctx.label_smoothing
        grad = softmax.clone()  # d loss / d logits
        if a > 0:
            grad[..., : ctx.real].sub_(a / ctx.vocab_size)  # padding's grad stays 0
        onehot = (1.0 - a) * (~outside).float()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits, target, label_smoothing: float = 0.0, vocab_size: int = None
):
    """Per-token loss [s, b] in fp32 from logits [s, b, v/tp] and target ids [s, b].

    vocab_size: the real vocabulary; ids from it up to the padded size are ignored
    (default: all of them are real)."""
    tp = state.get().tp
    padded = logits.shape[-1] * tp
    vocab_size = padded if vocab_size is None else vocab_size
    if tp == 1:
        s, b, _ = logits.shape
        if vocab_size < padded:  # (a slice's backward zero-fills a logits-sized tensor)
            logits = logits[..., :vocab_size]
        logits = logits.float().reshape(s * b, vocab_size)
        return F.cross_entropy(
            logits, target.reshape(s * b), reduction="none", label_smoothing=label_smoothing
        ).view(s, b)
    return _VocabParallelCrossEntropy.apply(logits, target, label_smoothing, vocab_size)
