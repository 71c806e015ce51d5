"""The preference and reward sections of the config: `dpo:`, `orpo:`, `grpo:` (only the one of the run's task is
read and saved). Names and defaults follow TRL's DPOConfig / ORPOConfig / GRPOConfig where those exist."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

OBJECTIVE_TASKS = ("dpo", "orpo", "grpo")
PAIR_TASKS = ("dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def _positive(value, key, zero_ok=False):
    if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"must be {'>= 0' if zero_ok else '> 0'}, got {value!r}.", key=key)


@dataclass
class DPOConfig:
    """Direct Preference Optimization (Rafailov et al. 2023)."""

    beta: float = field(default=0.1, metadata={"help": "How far from the reference the policy may move (smaller: "
                                                       "further). IPO's tau for loss_type ipo."})  # fmt: skip
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo (Azar et al.) or hinge (SLiC).",
                                                        "choices": DPO_LOSSES})  # fmt: skip

    def validate(self) -> None:
        _positive(self.beta, "dpo.beta")
        self.loss_type = str(self.loss_type).strip().lower()
        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"'{self.loss_type}' is not one of {', '.join(DPO_LOSSES)}.", key="dpo.loss_type")


@dataclass
class ORPOConfig:
    """Odds Ratio Preference Optimization (Hong et al. 2024): no reference model."""

    beta: float = field(default=0.1, metadata={"help": "Weight of the odds-ratio term next to the chosen answer's "
                                                       "language-model loss (the paper's lambda)."})  # fmt: skip

    def validate(self) -> None:
        _positive(self.beta, "orpo.beta")


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization (Shao et al. 2024) with reward functions from the notebook."""

    rewards: list = field(default_factory=list, metadata={"help": "Reward functions: [$name, ...], each "
                          "f(prompts, completions, **columns) -> one number per completion."})  # fmt: skip
    num_generations: int = field(default=4, metadata={"help": "Completions sampled per prompt (the group)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the completions."})
    beta: float = field(default=0.04, metadata={"help": "Weight of the KL term toward the reference (0: no "
                                                        "reference pass)."})  # fmt: skip
    epsilon: float = field(default=0.2, metadata={"help": "Clipping range of the probability ratio."})

    def validate(self) -> None:
        if not self.rewards:
            raise ConfigError("GRPO learns from reward functions and none is given. Fix: write one in a cell, e.g. "
                              "`def short(prompts, completions, **cols): return [-len(c) for c in completions]`, "
                              "and add `grpo: {rewards: [$short]}`.", key="grpo.rewards")  # fmt: skip
        for r in self.rewards:
            if not callable(r) and not (isinstance(r, str) and r.strip().startswith("$")):
                raise ConfigError(f"{r!r} is not a reward function. Fix: name a function of the notebook with $, "
                                  "e.g. `rewards: [$my_reward]`.", key="grpo.rewards")  # fmt: skip
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ConfigError(f"must be at least 2 (advantages compare completions of the same prompt), got "
                              f"{self.num_generations!r}.", key="grpo.num_generations")  # fmt: skip
        _positive(self.max_new_tokens, "grpo.max_new_tokens")
        _positive(self.temperature, "grpo.temperature")
        _positive(self.beta, "grpo.beta", zero_ok=True)
        _positive(self.epsilon, "grpo.epsilon")


SECTIONS = {"dpo": DPOConfig, "orpo": ORPOConfig, "grpo": GRPOConfig}
