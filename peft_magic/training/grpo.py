"""GRPO's pure pieces: group-normalized advantages and the clipped objective with a KL term to the reference.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, sec. 4.1, eqs. 3-4) as TRL's GRPOTrainer
computes it (loss_type="grpo"). TRL has it only inside its Trainer subclass, so the formulas are written here and
tested against hand-computed values (tests/test_preference.py).
"""

from __future__ import annotations


def group_advantages(rewards, num_generations: int, eps: float = 1e-4):
    """A_i = (r_i - mean(group)) / (std(group) + eps): each completion against the others for the same prompt.

    `rewards` holds num_generations consecutive completions per prompt. The std is the unbiased one (Bessel), as
    TRL's `nanstd`; eps = 1e-4 as TRL. A group whose rewards are all equal gets advantage 0 (nothing to learn).
    Returns (advantages, the per-group std repeated per completion).
    """
    groups = rewards.float().view(-1, num_generations)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)  # unbiased
    adv = (groups - mean) / (std + eps)
    return adv.reshape(-1), std.expand_as(groups).reshape(-1)


def k3_kl(logps, ref_logps):
    """Per-token KL(pi || ref) estimate exp(ref - pi) - (ref - pi) - 1 (Schulman's k3; DeepSeekMath eq. 4):
    unbiased, always >= 0."""
    import torch

    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def grpo_loss(logps, old_logps, advantages, mask, ref_logps=None, beta: float = 0.04, epsilon: float = 0.2):
    """The clipped surrogate with a KL penalty, per token, averaged over each completion's tokens then over
    completions (DeepSeekMath eq. 3; TRL loss_type="grpo"):

        ratio = exp(log pi - log pi_old);  L_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_t

    Args:
        logps: (completions x tokens) log-probs of the sampled tokens under the current policy (with grad).
        old_logps: the same under the policy that sampled them (detached; equal to `logps` for one update per
            generation, when the ratio is 1 but its gradient is not zero).
        advantages: one per completion (`group_advantages`).
        mask: 1 on completion tokens (up to and including EOS), 0 on padding.
        ref_logps: the reference policy's log-probs (None with beta = 0).
    Returns (loss, mean KL over completion tokens, detached).
    """
    import torch

    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logps is not None and beta != 0.0:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    mean_kl = (kl * mask).sum() / mask.sum().clamp(min=1.0) if kl is not None else torch.zeros(())
    return loss, mean_kl.detach()


def token_logps(logits, tokens):
    """log-probabilities of `tokens` (batch x n) under `logits` (batch x n x vocab) aligned to them."""
    import torch

    return torch.gather(torch.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)
