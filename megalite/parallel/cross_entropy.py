"""Cross entropy over vocab-parallel logits, in fp32, without gathering the full logits.

Each TP rank holds logits[..., v_start:v_end]. The loss needs three numbers per token from
the whole vocabulary, each one all-reduce of a [s, b] tensor: the max (for stability), the
target's logit (only the owner rank has it; the others add 0) and the sum of exponentials.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.parallel import state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing):
        # logits [s, b, v/tp] (any float dtype), target [s, b] -> loss [s, b] fp32
        st = state.get()
        group = st.tp_group
        logits = logits.float()
        vocab_local = logits.shape[-1]
        start = st.tp_rank * vocab_local

        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)                  # [s, b, v/tp]

        outside = (target < start) | (target >= start + vocab_local)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        if label_smoothing > 0:
            sum_shifted = shifted.sum(dim=-1)                        # for mean log-prob below
            dist.all_reduce(sum_shifted, group=group)
        exp = shifted.exp_()                                         # reuse the buffer
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit                            # [s, b]
        softmax = exp.div_(sum_exp.unsqueeze(-1))                    # [s, b, v/tp]

        vocab = vocab_local * st.tp
        if label_smoothing > 0:
            # Smoothed loss = (1-a) * nll + a * mean over the full vocab of -log p.
            mean_log_prob = sum_shifted / vocab - log_sum_exp
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_prob
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.label_smoothing = label_smoothing
        ctx.vocab = vocab
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        a = ctx.label_smoothing
        grad = softmax.clone()                                       # d loss / d logits
        if a > 0:
            grad.sub_(a / ctx.vocab)
        onehot = (1.0 - a) * (~outside).float()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None


def vocab_parallel_cross_entropy(logits, target, label_smoothing: float = 0.0):
    """Per-token loss [s, b] in fp32 from logits [s, b, v/tp] and target ids [s, b]."""
    if state.get().tp == 1:
        s, b, v = logits.shape
        return F.cross_entropy(logits.float().view(s * b, v), target.reshape(s * b),
                               reduction="none", label_smoothing=label_smoothing).view(s, b)
    return _VocabParallelCrossEntropy.apply(logits, target, label_smoothing)
