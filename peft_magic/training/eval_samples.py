"""`eval.samples: N` (causal LM): at each evaluation, greedy answers to N fixed prompts of the eval split.

The prompts are the first N eval examples cut where their last trained span begins (the answer the model should
give), so the model sees exactly what training shows it, template and all; a plain-text example (every token
trained) is cut in half, at most `PLAIN_PROMPT_TOKENS` tokens in. Generation runs with the adapter on, in eval mode
and inside `torch.random.fork_rng`, and train mode is put back: training goes on exactly as it would without it.

The answers travel in the evaluation's history row (``row["samples"]``, a list of ``{"prompt", "answer"}``), so
the live panel, the printed lines, the summary, the model card and a resumed run all read them from one place.
"""

from __future__ import annotations

PLAIN_PROMPT_TOKENS = 32  # plain text has no prompt: its first half (at most this many tokens) stands for one


def prompt_of(input_ids, labels) -> tuple[int, int] | None:
    """``(context_start, answer_start)`` of one tokenized example: the answer is the last trained span, the shown
    prompt the untrained text just before it (the last user turn with its template). None: nothing to prompt."""
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    if not trained or len(input_ids) < 2:
        return None
    start = trained[-1]
    while start - 1 >= 0 and labels[start - 1] != -100:
        start -= 1
    if start < 2:  # plain text: every token (but a BOS) trained
        start = max(1, min(len(input_ids) // 2, PLAIN_PROMPT_TOKENS))
        return 0, start
    before = [i for i in trained if i < start]
    return (before[-1] + 1 if before else 0), start


def pick_prompts(ds, tokenizer, n: int) -> list[tuple[list, str]]:
    """``[(prompt token ids, prompt text as shown)]`` of the first `n` usable examples of a tokenized split."""
    out = []
    for i in range(len(ds)):
        if len(out) == n:
            break
        row = ds[i]
        ids, labels = list(row["input_ids"]), list(row.get("labels") or row["input_ids"])
        cut = prompt_of(ids, labels)
        if cut is None:
            continue
        out.append((ids[: cut[1]], shown_prompt(tokenizer, ids[cut[0]:cut[1]])))
    return out


def shown_prompt(tokenizer, ids) -> str:
    """The prompt as the table shows it: the last user turn's text without the template around it (a default
    system prompt, role headers, the generation prompt) when the chat template says where it sits; else the
    context with special tokens dropped."""
    inner = _user_content(tokenizer, list(ids))
    return " ".join(tokenizer.decode(ids if inner is None else inner, skip_special_tokens=True).split())


_PROBE = "peftmagicprobe"


def _user_content(tokenizer, ids: list) -> list | None:
    """The tokens of `ids` between the template's user header and its generation prompt, found by rendering a
    probe message (matched as tokens: whitespace need not survive decoding); None without a template or when
    `ids` does not hold them."""
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
    except Exception:  # noqa: BLE001 - no template, or one that refuses a lone user turn: show the plain text
        return None
    if not isinstance(rendered, str) or rendered.count(_PROBE) != 1:
        return None
    prefix, suffix = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in rendered.split(_PROBE))
    # the longest end of the header found in ids: the user turn's start (a default system prompt may differ)
    start = None
    for k in range(len(prefix), 0, -1):
        at = _last_index(ids, prefix[-k:])
        if at is not None:
            start = at + k
            break
    if start is None:
        return None
    inner = ids[start:]
    if suffix and len(inner) > len(suffix) and inner[-len(suffix):] == suffix:  # the generation prompt
        inner = inner[: -len(suffix)]
    return inner or None


def _last_index(seq: list, sub: list) -> int | None:
    for i in range(len(seq) - len(sub), -1, -1):
        if seq[i : i + len(sub)] == sub:
            return i
    return None


class EvalSamples:
    """Greedy answers to fixed eval prompts, generated at each evaluation (`__call__`).

    Args:
        tokenizer: The run's tokenizer.
        prompts: ``[(token ids, shown text)]`` from `pick_prompts`.
        max_new_tokens: Tokens generated per answer at most (`eval.max_new_tokens`).
    """

    def __init__(self, tokenizer, prompts, max_new_tokens: int = 32):
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens

    @classmethod
    def from_config(cls, cfg, data) -> "EvalSamples | None":
        """The run's samples (`train.eval_samples`), or None when off or there is nothing to prompt with."""
        n = getattr(cfg.train, "eval_samples", 0)
        if not n or cfg.task != "causal-lm" or data.eval is None or not len(data.eval) or data.tokenizer is None:
            return None
        prompts = pick_prompts(data.eval, data.tokenizer, n)
        return cls(data.tokenizer, prompts, cfg.train.eval_max_new_tokens) if prompts else None

    def __call__(self, model, accelerator=None) -> list[dict]:
        """``[{"prompt", "answer"}]``: each prompt completed greedily by `model` (adapter on). The model's train
        mode and every random generator are as they were before."""
        import warnings

        import torch

        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        device = accelerator.device if accelerator is not None else next(unwrapped.parameters()).device
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(ids) for ids, _ in self.prompts)
        # left padding: a decoder-only model continues from the right edge
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in self.prompts], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in self.prompts], device=device)
        was = unwrapped.training
        unwrapped.eval()  # no dropout
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                with warnings.catch_warnings():  # the model's sampling defaults do not apply to greedy decoding
                    warnings.simplefilter("ignore")
                    out = unwrapped.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                             max_new_tokens=self.max_new_tokens, pad_token_id=pad,
                                             eos_token_id=tok.eos_token_id)  # fmt: skip
        finally:
            if was:
                unwrapped.train()
        answers = tok.batch_decode(out[:, width:].tolist(), skip_special_tokens=True)
        return [{"prompt": text, "answer": " ".join(a.split())} for (_, text), a in zip(self.prompts, answers)]
