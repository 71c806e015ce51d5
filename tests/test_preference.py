"""Preference and reward losses against values computed by hand (math, not torch) on fixed log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from peft_magic.training.grpo import group_advantages, grpo_loss, k3_kl
from peft_magic.training.preference import completion_logps, dpo_loss, orpo_loss

T = torch.tensor


def _sig(x):
    return 1 / (1 + math.exp(-x))


# policy chosen, policy rejected, reference chosen, reference rejected (summed log-probs of two pairs)
PC, PR, RC, RR = [-5.0, -7.0], [-9.0, -6.0], [-6.0, -6.5], [-8.0, -6.5]


def _h(i):
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


def test_dpo_sigmoid_by_hand():
    beta = 0.1
    out = dpo_loss(T(PC), T(PR), T(RC), T(RR), beta, "sigmoid")
    expected = sum(-math.log(_sig(beta * _h(i))) for i in range(2)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * (PC[i] - RC[i]) for i in range(2)])
    assert out.rejected_rewards.tolist() == pytest.approx([beta * (PR[i] - RR[i]) for i in range(2)])
    # pair 0: h = 1 - (-1) = 2 > 0 (chosen preferred); pair 1: h = -0.5 - 0.5 = -1
    assert out.accuracies.tolist() == [1.0, 0.0]
    assert out.margins.tolist() == pytest.approx([beta * _h(0), beta * _h(1)])


def test_dpo_hinge_by_hand():
    beta = 0.8
    out = dpo_loss(T(PC), T(PR), T(RC), T(RR), beta, "hinge")
    expected = (max(0.0, 1 - beta * _h(0)) + max(0.0, 1 - beta * _h(1))) / 2  # (0 + 1.8) / 2
    assert out.loss.item() == pytest.approx(expected)
    assert expected == pytest.approx(0.9)


def test_ipo_uses_per_token_means_by_hand():
    beta, nc, nr = 0.5, T([2, 4]), T([3, 1])
    out = dpo_loss(T(PC), T(PR), T(RC), T(RR), beta, "ipo", n_chosen=nc, n_rejected=nr)
    per = [((PC[i] - RC[i]) / nc[i].item() - (PR[i] - RR[i]) / nr[i].item() - 1 / (2 * beta)) ** 2 for i in range(2)]
    assert out.loss.item() == pytest.approx(sum(per) / 2)


def test_orpo_by_hand():
    beta, pc, pr, nll = 0.2, [-0.5, -2.0], [-1.5, -0.1], 0.7
    out = orpo_loss(T(pc), T(pr), T(nll), beta)

    def log_odds(p):
        return p - math.log(1 - math.exp(p))

    ratio = [math.log(_sig(log_odds(pc[i]) - log_odds(pr[i]))) for i in range(2)]
    assert out.loss.item() == pytest.approx(nll - beta * sum(ratio) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * p for p in pc])
    assert out.accuracies.tolist() == [1.0, 0.0]


def test_completion_logps_count_only_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    ids = [3, 1, 4, 6, 2]
    labels = T([[-100, -100, 4, 6, -100]])  # prompt 3 1, completion 4 6, padding
    total, n = completion_logps(logits, labels)
    logp = torch.log_softmax(logits[0], -1)
    assert n.item() == 2
    assert total.item() == pytest.approx((logp[1, ids[2]] + logp[2, ids[3]]).item(), rel=1e-6)
    avg, _ = completion_logps(logits, labels, average=True)
    assert avg.item() == pytest.approx(total.item() / 2, rel=1e-6)


def test_group_advantages_by_hand():
    rewards = T([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, four completions each
    adv, std = group_advantages(rewards, 4)
    s = math.sqrt(sum((r - 0.5) ** 2 for r in [1, 0, 0, 1]) / 3)  # unbiased std of group 1
    assert adv[:4].tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4)])
    assert adv[4:].tolist() == [0.0] * 4  # equal rewards: nothing to learn
    assert std[0].item() == pytest.approx(s) and std[4].item() == 0.0


def test_k3_kl_by_hand_and_nonnegative():
    lp, ref = T([-1.0, -2.0, -0.5]), T([-1.5, -2.0, 0.0])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(lp.tolist(), ref.tolist())]
    assert k3_kl(lp, ref).tolist() == pytest.approx(expected)
    assert k3_kl(lp, ref)[1].item() == 0.0 and (k3_kl(lp, ref) >= 0).all()


def test_grpo_loss_by_hand():
    logps = T([[-1.0, -2.0, -3.0], [-0.5, -1.0, -9.0]])
    old = T([[-1.2, -2.0, -2.0], [-0.5, -0.2, -9.0]])
    ref = T([[-1.0, -1.5, -3.0], [-0.7, -1.0, -9.0]])
    adv, mask = T([1.5, -0.5]), T([[1, 1, 1], [1, 1, 0]])
    beta, eps = 0.1, 0.2
    loss, kl = grpo_loss(logps, old, adv, mask, ref, beta=beta, epsilon=eps)
    per_seq, kls = [], []
    for i in range(2):
        terms = []
        for t in range(3):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t].item() - old[i, t].item())
            clip = min(max(ratio, 1 - eps), 1 + eps)
            a = adv[i].item()
            d = ref[i, t].item() - logps[i, t].item()
            k = math.exp(d) - d - 1
            kls.append(k)
            terms.append(-min(ratio * a, clip * a) + beta * k)
        per_seq.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    assert kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-6)


def test_grpo_gradient_follows_advantage():
    """With one update per generation (old = current, detached) the ratio is 1 and the gradient is -A/len per
    sampled token: completions with positive advantage become more likely."""
    logps = T([[-1.0, -2.0], [-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), T([1.0, -1.0]), torch.ones(2, 2), None, beta=0.0)
    loss.backward()
    assert logps.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.25])


def test_demo_preference_data_prefers_the_house_style_and_holds_out_facts():
    from peft_magic.demo_data import DEMO_PROMPTS, follows_house_style, preference_data, reward_prompts

    train, held = preference_data(), preference_data(held_out=True)
    text = lambda col: [m[0]["content"] for m in col]  # noqa: E731
    assert all(follows_house_style(c) for c in text(train["chosen"]))
    assert all(c != r for c, r in zip(text(train["chosen"]), text(train["rejected"])))
    wrong = sum(follows_house_style(r) for r in text(train["rejected"]))  # the wrong-fact share
    assert 0.15 < wrong / len(train) < 0.35 and len(held) == 16
    assert set(DEMO_PROMPTS) <= set(text(held["prompt"])) and not set(text(held["prompt"])) & set(text(train["prompt"]))
    assert all(m[0]["role"] == "user" for m in train["prompt"]) and train.equals(preference_data())
    prompts = reward_prompts()
    assert len(prompts) == len(train) and set(text(prompts["prompt"])) == set(text(train["prompt"]))
    assert "Answer: " + prompts["answer"][0] + "." in text(train["chosen"])
