"""Preference losses: DPO (sigmoid, ipo, hinge) and ORPO, as pure functions of sequence log-probabilities.

TRL has these only inside its Trainer subclasses (DPOTrainer, the experimental ORPOTrainer), which our own loop
cannot use, so they are written here with the formula cited and tested against hand-computed values
(tests/test_preference.py). Names follow the papers and TRL so users can paste TRL's settings.
"""

from __future__ import annotations

from dataclasses import dataclass

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class PreferenceOut:
    """The batch loss and the figures the panel shows (detached, one value per pair)."""

    loss: object  # scalar tensor, the objective
    chosen_rewards: object
    rejected_rewards: object

    @property
    def margins(self):
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self):
        return (self.chosen_rewards > self.rejected_rewards).float()


def completion_logps(logits, labels, average: bool = False):
    """Per-sequence log-probability of the labelled (completion) tokens: labels are -100 on the prompt and the
    padding, so prompt tokens never count. `logits` are the model's (batch x length x vocab) for the same
    input_ids, so position t predicts token t + 1. Returns (sum or per-token mean, number of tokens)."""
    import torch

    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = torch.gather(logp, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    n = mask.sum(-1)
    total = (token * mask).sum(-1)
    return (total / n.clamp(min=1) if average else total), n


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             n_chosen=None, n_rejected=None) -> PreferenceOut:  # fmt: skip
    """Direct Preference Optimization on summed completion log-probs.

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
      sigmoid: -log sigmoid(beta * h)            (Rafailov et al. 2023, eq. 7; TRL loss_type="sigmoid")
      hinge:   relu(1 - beta * h)                 (SLiC, Zhao et al. 2023; TRL loss_type="hinge")
      ipo:     (h_avg - 1 / (2 * beta))^2         (Azar et al. 2023, eq. 17; tau = beta), where h_avg uses the
               per-token mean log-probs, as TRL does (confirmed with the IPO authors, see TRL's DPOTrainer); give
               n_chosen / n_rejected (completion token counts) for it.
    Rewards (the panel's): beta * (log pi - log ref) of each answer (the implicit reward of the DPO paper, sec. 5).
    """
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if n_chosen is None or n_rejected is None:
            raise ValueError("ipo needs the completion token counts (n_chosen, n_rejected)")
        h = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (one of {', '.join(DPO_LOSSES)})")
    return PreferenceOut(losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012; TRL's ORPO uses the same)."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg, rejected_avg, chosen_nll, beta: float) -> PreferenceOut:
    """Odds Ratio Preference Optimization (Hong et al. 2024, eqs. 4-7), no reference model.

    With the per-token mean log-probs p_w, p_l of the chosen and rejected answers,
    log odds(y) = p - log(1 - exp(p)), and the loss is  NLL(y_w) - beta * log sigmoid(log odds(y_w) - log odds(y_l)).
    `chosen_nll` is the supervised loss on the chosen answer (mean over its tokens). Rewards: beta * p (as TRL).
    """
    import torch.nn.functional as F

    chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll - beta * ratio.mean()
    return PreferenceOut(loss, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())
