"""What a training step optimises, per run: the model's own loss (supervised), DPO/ORPO on preference pairs, or
GRPO on completions sampled from the policy and scored by the notebook's reward functions.

The engine asks `make_objective` once per run and then calls ``objective(model, batch)`` where it would call
``model(**batch).loss``; everything else (accumulation, clipping, Stop, checkpoints, events) stays the loop's.
The figures a step produces (rewards, margins, accuracy, KL...) are summed on the device and read back only at
logging time (`flush`), like the loss.

The reference policy is the base model with the adapter disabled (peft's `disable_adapter()`, no second copy in
memory); a method that changes the base weights themselves (full, selective) gets a frozen copy made before the
method is applied (`keep_reference`), which the pre-flight counts.
"""

from __future__ import annotations

import contextlib
from collections import deque

from ..config.objectives import OBJECTIVE_TASKS, PAIR_TASKS
from ..errors import TrainingFailed

SAMPLES_KEPT = 8  # the panel's table of recent GRPO samples


class RewardError(TrainingFailed):
    """A reward function raised, or returned the wrong number of values or a non-number."""


def keep_reference(cfg, model, method):
    """A frozen copy of the base for dpo/grpo when the method trains the base weights themselves (no adapter to
    disable); None otherwise. Called before `method.apply`."""
    if cfg.task not in ("dpo", "grpo") or (cfg.task == "grpo" and cfg.grpo.beta == 0):
        return None
    from ..methods.peft_methods import PeftMethod

    if isinstance(method, PeftMethod):
        return None
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@contextlib.contextmanager
def reference_model(unwrapped, reference=None):
    """The reference policy to run a forward pass with: the frozen copy, or the model with its adapter off."""
    if reference is not None:
        yield reference
        return
    with unwrapped.disable_adapter():
        yield unwrapped


def make_objective(cfg, data, accelerator, state):
    """The run's objective, or None for the model's own (supervised) loss."""
    if cfg.task in PAIR_TASKS:
        return PairObjective(cfg, data, accelerator)
    if cfg.task == "grpo":
        return GRPOObjective(cfg, data, accelerator, state)
    return None


class _Sums:
    """Figures summed on the device between two log rows (no host sync per step)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, name, values):
        v = values.detach().float().sum()
        self.sums[name] = self.sums.get(name, 0) + v
        self.counts[name] = self.counts.get(name, 0) + values.numel()

    def flush(self, accelerator=None) -> dict:
        out = {}
        for k, v in self.sums.items():
            if accelerator is not None:
                v = accelerator.reduce(v, reduction="mean")
            out[k] = float(v) / max(self.counts[k], 1)
        self.sums, self.counts = {}, {}
        return out


def _unwrap(accelerator, model):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _position_ids(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------- DPO / ORPO


class PairObjective:
    """DPO or ORPO on a `PairCollator` batch (rows [0, n) chosen, [n, 2n) rejected)."""

    def __init__(self, cfg, data, accelerator):
        self.task, self.accelerator = cfg.task, accelerator
        self.section = getattr(cfg, cfg.task)
        self.reference = getattr(data, "reference", None)
        self.sums = _Sums()

    def compute(self, model, batch):
        import torch

        from .preference import completion_logps, dpo_loss, orpo_loss

        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n = ids.shape[0] // 2
        logits = model(input_ids=ids, attention_mask=mask).logits
        if self.task == "orpo":
            avg, ntok = completion_logps(logits, labels, average=True)
            del logits
            nll = -(avg[:n] * ntok[:n]).sum() / ntok[:n].sum().clamp(min=1)  # the chosen answers' LM loss
            return orpo_loss(avg[:n], avg[n:], nll, self.section.beta), nll
        logps, ntok = completion_logps(logits, labels)
        del logits
        with torch.no_grad(), reference_model(_unwrap(self.accelerator, model), self.reference) as ref:
            ref_logps, _ = completion_logps(ref(input_ids=ids, attention_mask=mask).logits, labels)
        out = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], self.section.beta,
                       self.section.loss_type, ntok[:n], ntok[n:])  # fmt: skip
        return out, None

    def record(self, out, nll, sums):
        sums.add("rewards_chosen", out.chosen_rewards)
        sums.add("rewards_rejected", out.rejected_rewards)
        sums.add("rewards_margin", out.margins)
        sums.add("rewards_accuracy", out.accuracies)
        if nll is not None:
            sums.add("nll_loss", nll.detach().reshape(1))

    def __call__(self, model, batch):
        out, nll = self.compute(model, batch)
        self.record(out, nll, self.sums)
        return out.loss

    def flush(self) -> dict:
        return self.sums.flush(self.accelerator)

    def evaluate(self, model, dataloader) -> dict:
        """Eval split: the loss, preference accuracy and mean margin (implicit rewards as in training)."""
        import torch

        sums = _Sums()
        was = model.training
        model.eval()
        device = self.accelerator.device if self.accelerator is not None else next(model.parameters()).device
        with torch.no_grad():
            for batch in dataloader:
                batch = {k: v.to(device) for k, v in batch.items()}
                out, nll = self.compute(model, batch)
                sums.add("loss", out.loss.reshape(1))
                self.record(out, nll, sums)
        if was:
            model.train()
        return sums.flush(self.accelerator)


# ---------------------------------------------------------------- GRPO


class GRPOObjective:
    """Sample `num_generations` completions per prompt with the policy, score them, and take the clipped GRPO
    objective (one update per generation, as TRL's default, so the old policy is the current one, detached)."""

    def __init__(self, cfg, data, accelerator, state=None):
        self.cfg, self.g, self.accelerator, self.state = cfg, cfg.grpo, accelerator, state
        self.tokenizer = data.tokenizer
        self.rewards = data.objective["rewards"]
        self.rows = data.objective["rows"]
        self.reference = getattr(data, "reference", None)
        self.sums = _Sums()
        self.samples = deque(maxlen=SAMPLES_KEPT)
        self._micro = (None, 0)

    def _seed(self) -> int:
        """Sampling seed of this micro-batch from (seed, step, micro-batch): a resumed run samples the same."""
        step = getattr(self.state, "step", 0) if self.state is not None else 0
        last, micro = self._micro
        micro = micro + 1 if last == step else 0
        self._micro = (step, micro)
        return (self.cfg.train.seed * 1_000_003 + step * 1_009 + micro) % (2**63)

    def generate(self, unwrapped, batch, sample=True, seed=0):
        """(sequences, prompt width, completion mask): completions end at their first EOS (kept, trained)."""
        import torch

        tok = self.tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        devices = [batch["input_ids"].device] if batch["input_ids"].device.type == "cuda" else []
        kw = {"do_sample": True, "temperature": self.g.temperature, "top_k": 0, "top_p": 1.0,
              "num_return_sequences": self.g.num_generations} if sample else {"do_sample": False}  # fmt: skip
        was = unwrapped.training
        unwrapped.eval()  # no dropout while sampling
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            seqs = unwrapped.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      max_new_tokens=self.g.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                      **kw)  # fmt: skip
        if was:
            unwrapped.train()
        width = batch["input_ids"].shape[1]
        completion = seqs[:, width:]
        is_eos = completion == eos
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], completion.shape[1], dtype=torch.long))  # fmt: skip
        cmask = (torch.arange(completion.shape[1], device=seqs.device)[None] <= first[:, None]).long()
        return seqs, width, cmask

    def decode(self, completion, cmask) -> list:
        lengths = cmask.sum(1).tolist()
        return [self.tokenizer.decode(c[:n], skip_special_tokens=True) for c, n in zip(completion.tolist(), lengths)]

    def score(self, batch, completions, split, per_prompt):
        """Call every reward function: a (completions x functions) tensor; one clear line on a bad function."""
        import torch

        from ..data.preference import prompt_of

        ds = self.rows[split]
        dcfg = self.cfg.data
        idx = [int(r) for r in batch["row"].tolist() for _ in range(per_prompt)]
        rows = {r: ds[r] for r in set(idx)}
        prompts = [prompt_of(rows[r], r, dcfg, f"data.{split}") for r in idx]
        columns = {c: [rows[r][c] for r in idx] for c in ds.column_names if c != dcfg.prompt_column}
        out = []
        for name, fn in self.rewards:
            try:
                values = fn(prompts=prompts, completions=completions, **columns)
            except Exception as e:  # noqa: BLE001 - the user's function: one line naming it and the row
                raise RewardError(f"reward function '{name}' raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                  f"(on the completions of {split} row {idx[0]}). The last checkpoint is kept; fix "
                                  "the function and resume.") from None  # fmt: skip
            values = list(values) if not isinstance(values, (str, bytes)) and hasattr(values, "__len__") else values
            if not isinstance(values, list) or len(values) != len(completions):
                got = f"{len(values)} values" if isinstance(values, list) else f"a {type(values).__name__}"
                raise RewardError(f"reward function '{name}' returned {got} for {len(completions)} completions ({split} "
                                  f"rows {idx[0]}..{idx[-1]}). Fix: return one number per completion.")  # fmt: skip
            for j, v in enumerate(values):
                if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
                    raise RewardError(f"reward function '{name}' returned {v!r} ({type(v).__name__}) for completion {j} "
                                      f"({split} row {idx[j]}). Fix: return a number (float) per completion.")  # fmt: skip
            out.append([float(v) for v in values])
        return torch.tensor(out, dtype=torch.float32).T, prompts

    def __call__(self, model, batch):
        from .grpo import group_advantages, grpo_loss, token_logps

        import torch

        unwrapped = _unwrap(self.accelerator, model)
        G = self.g.num_generations
        seqs, width, cmask = self.generate(unwrapped, batch, seed=self._seed())
        completion = seqs[:, width:]
        texts = self.decode(completion, cmask)
        scores, prompts = self.score(batch, texts, "train", G)
        scores = scores.to(seqs.device)
        total = scores.sum(1)
        adv, std = group_advantages(total, G)
        mask = torch.cat([batch["attention_mask"].repeat_interleave(G, 0), cmask], 1)
        pos = _position_ids(mask)
        ref_lp = None
        if self.g.beta != 0:
            with torch.no_grad(), reference_model(unwrapped, self.reference) as ref:
                ref_lp = token_logps(ref(input_ids=seqs, attention_mask=mask, position_ids=pos).logits[:, width - 1:-1], completion)  # fmt: skip
        logits = model(input_ids=seqs, attention_mask=mask, position_ids=pos).logits[:, width - 1:-1]
        lp = token_logps(logits, completion)
        del logits
        loss, kl = grpo_loss(lp, lp.detach(), adv, cmask, ref_lp, beta=self.g.beta, epsilon=self.g.epsilon)
        for (name, _), col in zip(self.rewards, scores.T):
            self.sums.add(f"reward_{name}", col)
        self.sums.add("reward", total)
        self.sums.add("reward_std", std.view(-1, G)[:, 0])
        self.sums.add("completion_length", cmask.sum(1))
        self.sums.add("kl", kl.reshape(1))
        for p, t, r in list(zip(prompts, texts, total.tolist()))[::G][-SAMPLES_KEPT:]:
            self.samples.append({"step": getattr(self.state, "step", 0) + 1, "prompt": p if isinstance(p, str) else p[-1]["content"],
                                 "completion": t, "reward": r})  # fmt: skip
        return loss

    def flush(self) -> dict:
        out = self.sums.flush(self.accelerator)
        if self.samples:
            out["_samples"] = list(self.samples)  # not a number: kept out of history by the engine's row filter
        return out

    def evaluate(self, model, dataloader) -> dict:
        """Eval prompts, greedy: mean reward per function and in total, completion length."""
        import torch

        sums = _Sums()
        unwrapped = _unwrap(self.accelerator, model)
        device = next(unwrapped.parameters()).device
        for batch in dataloader:
            batch = {k: v.to(device) for k, v in batch.items()}
            seqs, width, cmask = self.generate(unwrapped, batch, sample=False)
            texts = self.decode(seqs[:, width:], cmask)
            scores, _ = self.score(batch, texts, "eval", 1)
            for (name, _), col in zip(self.rewards, scores.T):
                sums.add(f"reward_{name}", col)
            sums.add("reward", scores.sum(1))
            sums.add("completion_length", cmask.sum(1).float())
        return sums.flush(self.accelerator)


def evaluate_objective(model, dataloader, accelerator, cfg, data) -> dict:
    """`evaluate_fn` of dpo/orpo/grpo runs."""
    objective = make_objective(cfg, data, accelerator, None)
    return objective.evaluate(model, dataloader)


# ---------------------------------------------------------------- the plan and the pre-flight


def step_tokens(cfg, seq_len: int) -> int:
    """Tokens per example whose activations a step keeps: chosen + rejected for dpo/orpo (one forward of both);
    the num_generations completions of each prompt, prompt + max_new_tokens long, for grpo."""
    if cfg.task in PAIR_TASKS:
        return 2 * seq_len
    if cfg.task == "grpo":
        return cfg.grpo.num_generations * (seq_len + cfg.grpo.max_new_tokens)
    return seq_len


def with_reference_pass(est, cfg, seq_len=None):
    """The pre-flight of a dpo/grpo run: the reference pass (no activations kept, but its fp32 logits live next
    to the policy's) and, for a method without an adapter to disable, the frozen copy of the weights."""
    import dataclasses

    if cfg.task not in ("dpo", "grpo") or (cfg.task == "grpo" and cfg.grpo.beta == 0):
        return est
    config = est.inputs.get("model_config")
    vocab = getattr(getattr(config, "get_text_config", lambda: config)(), "vocab_size", 0) or 0
    tokens = step_tokens(cfg, seq_len or cfg.data.max_length) * cfg.train.per_device_train_batch_size
    logits = tokens * vocab * 4
    from ..methods import get_method
    from ..methods.peft_methods import PeftMethod

    copy = 0 if isinstance(get_method(cfg.method.name), PeftMethod) else est.weights  # see keep_reference
    return dataclasses.replace(est, activations=est.activations + logits, weights=est.weights + copy,
                               total=est.total + logits + copy)  # fmt: skip


def plan_rows(cfg, data) -> dict:
    """The dry run's rows for dpo/orpo/grpo: the objective, the reference, what one step computes."""
    t = cfg.train
    b = t.per_device_train_batch_size
    avg = data.train_tokens / max(data.train_rows, 1)
    if cfg.task in PAIR_TASKS:
        s = getattr(cfg, cfg.task)
        what = f"DPO ({s.loss_type}) beta {s.beta:g}" if cfg.task == "dpo" else f"ORPO beta {s.beta:g} (no reference)"
        ref = "" if cfg.task == "orpo" else " · reference: " + ("the base, adapter disabled (no copy)" if cfg.method.name != "full"
                                                               else "a frozen copy of the base")  # fmt: skip
        return {"objective": what + ref,
                "per step": f"{b} pairs x accum {t.gradient_accumulation_steps}: {2 * b} sequences per forward "
                            f"(~{format(round(2 * b * avg), ',')} tokens){' + the same through the reference' if cfg.task == 'dpo' else ''}"}  # fmt: skip
    g = cfg.grpo
    names = ", ".join(r if isinstance(r, str) else getattr(r, "__name__", "?") for r in g.rewards)
    n = b * g.num_generations
    return {"objective": f"GRPO · rewards {names} · beta {g.beta:g} · epsilon {g.epsilon:g}",
            "per step": f"{b} prompts x {g.num_generations} generations = {n} completions per micro-batch, up to "
                        f"{g.max_new_tokens} new tokens each (≤ {format(round(n * (avg + g.max_new_tokens)), ',')} "
                        f"tokens/step through the policy{' and the reference' if g.beta else ''}), temperature "
                        f"{g.temperature:g}"}  # fmt: skip


def evaluate_on(run, data=None, namespace=None) -> dict:
    """`%peft_eval` / `Run.evaluate` of a dpo/orpo/grpo run: its eval split, or another source of pairs/prompts."""
    import copy

    from torch.utils.data import DataLoader

    from ..data import preference
    from ..data.prepare import resolve
    from ..errors import ConfigError

    cfg, prepared = run.config, run.data
    if prepared is None:
        raise ConfigError("this run holds no prepared data (it was loaded from an export). Fix: evaluate the run "
                          "that trained it, in the same kernel.", key=run.name)  # fmt: skip
    rows = (getattr(prepared, "objective", None) or {}).get("rows", {}).get("eval")
    if data is None:
        if prepared.eval is None:
            raise ConfigError("this run has no eval data. Fix: run.evaluate(data=...) or set `data.eval`.", key="data.eval")
        ds = prepared.eval
    else:
        rows = resolve(data, namespace, "data")
        ds = (preference.tokenize_pairs(rows, run.tokenizer, cfg.data, "data")[0] if cfg.task in PAIR_TASKS
              else preference.tokenize_prompts(rows, run.tokenizer, cfg.data, "data"))  # fmt: skip
    view = copy.copy(prepared)
    view.objective = {**(getattr(prepared, "objective", None) or {}), "rows": {"eval": rows}}
    dl = DataLoader(ds.with_format("python"), batch_size=cfg.train.per_device_eval_batch_size,
                    collate_fn=prepared.collator)  # fmt: skip
    return make_objective(cfg, view, None, None).evaluate(run.model, dl)


__all__ = ["OBJECTIVE_TASKS", "make_objective", "evaluate_objective", "keep_reference", "RewardError"]
