"""Does the exported GGUF answer like the notebook model? The same prompts through both, greedy, side by side.

For each prompt: the notebook model's answer (as `run.generate` gives it), the answer llama.cpp gives from the
GGUF file with the GGUF's own chat template and tokenizer, whether they agree, and the mean per-token
log-likelihood of the notebook's answer under each model (same token ids on both sides, so the two figures
measure the weights alone). When they disagree the report names the likely cause: the prompt tokenized
differently (template or tokenizer lost on the way), quantization too coarse, or near-ties in greedy decoding.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import os
from dataclasses import dataclass, field

INSTALL_HINT = "pip install 'peft-magic[gguf-check]' (llama-cpp-python) to compare the GGUF with the notebook model"
COARSE = ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m")
# below this mean log-likelihood gap per token the two models score the answers alike: a split answer is a near-tie,
# even from a coarse file (the base the notebook trained on may itself be q4_1, the same weights on both sides)
NEAR_TIE_GAP = 0.05


@dataclass
class ParityRow:
    prompt: str
    notebook: str
    gguf: str
    ll_notebook: float  # mean log-probability per token of the notebook's answer, notebook model
    ll_gguf: float  # the same answer tokens, under llama.cpp
    same_prompt_tokens: bool  # llama.cpp's template + tokenizer gave the notebook's prompt ids

    @property
    def agree(self) -> bool:
        return _norm(self.notebook) == _norm(self.gguf)


@dataclass
class ParityReport:
    """What `check_parity` found (also `run.last_export.parity`)."""

    file: str
    quant: str | None = None
    rows: list[ParityRow] = field(default_factory=list)
    skipped: str | None = None

    @property
    def agreement(self) -> float:
        return sum(r.agree for r in self.rows) / len(self.rows) if self.rows else float("nan")

    @property
    def max_ll_gap(self) -> float:
        return max((abs(r.ll_notebook - r.ll_gguf) for r in self.rows), default=0.0)

    @property
    def ok(self) -> bool:
        return not self.skipped and bool(self.rows) and all(r.agree for r in self.rows)

    @property
    def verdict(self) -> str:
        if self.skipped:
            return f"parity check skipped: {self.skipped}"
        n, agree = len(self.rows), sum(r.agree for r in self.rows)
        gap = f"log-likelihood gap at most {self.max_ll_gap:.3f} per token"
        if agree == n:
            return f"the GGUF answers like the notebook model: {agree}/{n} greedy answers identical, {gap}."
        return f"the GGUF differs from the notebook model: {agree}/{n} greedy answers identical, {gap}. Likely cause: {self.cause}"

    @property
    def cause(self) -> str:
        if any(not r.same_prompt_tokens for r in self.rows):
            return ("llama.cpp builds a different prompt (chat template or tokenizer differs in the file); the model "
                    "sees other tokens than in the notebook.")  # fmt: skip
        coarse = (self.quant or "").lower() in COARSE
        if self.max_ll_gap > 0.1 or (coarse and self.max_ll_gap > NEAR_TIE_GAP):
            return (f"quantization ({self.quant}) moves the logits enough to change greedy choices. Fix: export "
                    "q8_0 or f16.")  # fmt: skip
        return ("near-ties in greedy decoding: the log-likelihoods agree closely, so the answers split on tokens of "
                "almost equal probability (numerical noise, not a broken export).")  # fmt: skip

    def text(self) -> str:
        if self.skipped:
            return self.verdict
        lines = [f"parity: notebook model vs {os.path.basename(self.file)} in llama.cpp (greedy)"]
        for r in self.rows:
            mark = "same" if r.agree else "DIFFERENT"
            lines += [f"  prompt:   {r.prompt}", f"  notebook: {r.notebook}", f"  gguf:     {r.gguf}",
                      f"  {mark} · log-likelihood/token notebook {r.ll_notebook:.3f} · gguf {r.ll_gguf:.3f}"]  # fmt: skip
        lines.append(self.verdict)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        if self.skipped:
            return f"<p><b>GGUF parity</b>: {html.escape(self.verdict)}</p>"
        e = html.escape
        head = "".join(f"<th style='text-align:left'>{h}</th>" for h in
                       ("prompt", "notebook answer", "GGUF answer (llama.cpp)", "agree", "log-lik/token notebook", "log-lik/token GGUF"))  # fmt: skip
        body = "".join(
            f"<tr><td>{e(r.prompt)}</td><td>{e(r.notebook)}</td><td>{e(r.gguf)}</td>"
            f"<td style='color:{'green' if r.agree else 'red'}'>{'yes' if r.agree else 'no'}</td>"
            f"<td>{r.ll_notebook:.3f}</td><td>{r.ll_gguf:.3f}</td></tr>"
            for r in self.rows
        )
        color = "green" if self.ok else "#b00"
        return (f"<div><b>GGUF parity</b>: notebook model vs <code>{e(os.path.basename(self.file))}</code> in llama.cpp, "
                f"greedy<table><tr>{head}</tr>{body}</table><p style='color:{color}'>{e(self.verdict)}</p></div>")  # fmt: skip


def _norm(text: str) -> str:
    return " ".join(text.split())


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """A GGUF file (optionally with a LoRA GGUF) in llama.cpp, through llama-cpp-python."""

    def __init__(self, path: str, lora_path: str | None = None, n_ctx: int = 512, threads: int | None = None):
        import llama_cpp

        threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 2) // 2)
        self.llm = llama_cpp.Llama(model_path=path, lora_path=lora_path, n_ctx=n_ctx, logits_all=True,
                                   verbose=False, n_threads=threads, n_threads_batch=threads)  # fmt: skip
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._lib = llama_cpp

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str, bos_text: str | None = None) -> list[int]:
        add_bos = bool(self._lib.llama_vocab_get_add_bos(self._vocab)) and not (bos_text and text.startswith(bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if self._lib.llama_vocab_is_eog(self._vocab, tok):
                break
            out.append(tok)
            self.llm.eval([tok])
        return out

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace").strip()

    def mean_loglik(self, prompt_ids: list[int], answer_ids: list[int]) -> float:
        import numpy as np

        if not answer_ids:
            return float("nan")
        self.llm.reset()
        self.llm.eval(prompt_ids + answer_ids)
        logits = np.asarray(self.llm.scores[len(prompt_ids) - 1: len(prompt_ids) + len(answer_ids) - 1], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return float(np.mean(logp[np.arange(len(answer_ids)), answer_ids]))

    def close(self) -> None:
        self.llm.close()


def prompt_ids(tokenizer, prompt: str, chat: bool, template: str | None):
    """(ids, text) of a prompt as `run.generate` builds it: the chat `template` applied when the run trained on
    chat/instruction data (no template: the prompt and a newline), BOS added unless the template wrote it."""
    if chat and template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, chat_template=template)  # fmt: skip
    else:
        text = prompt + "\n" if chat else prompt
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"], text


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (dropout off) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def notebook_answer(model, tokenizer, ids: list[int], max_new_tokens: int):
    """Greedy answer ids and text of the notebook model (the same decoding as `run.generate`)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model):
        out = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new = out[0, len(ids):].tolist()
    from .vocab import special_tokens

    special = set(special_tokens(tokenizer).values())
    while new and new[-1] in special:  # the end-of-turn token: not part of the answer's likelihood
        new.pop()
    return new, tokenizer.decode(new, skip_special_tokens=True).strip()


def notebook_loglik(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    import torch

    if not answer_ids:
        return float("nan")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    with torch.no_grad(), eval_mode(model):  # dropout off, as in generation
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].float()
    logp = torch.log_softmax(logits, -1)
    return float(logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids, device=device)].mean())


def check_parity(model, tokenizer, gguf_path: str, prompts, *, lora_path: str | None = None, chat: bool = True,
                 max_new_tokens: int = 24, quant: str | None = None, progress=None,
                 notebook_cache: dict | None = None) -> ParityReport:  # fmt: skip
    """Run `prompts` through the notebook `model` and through `gguf_path` (+ `lora_path`) in llama.cpp.

    Returns a `ParityReport`; with llama-cpp-python missing, one whose `skipped` says how to install it.
    `notebook_cache` (a dict shared between calls) keeps the notebook side, computed once per prompt.
    """
    label = gguf_path if not lora_path else f"{os.path.basename(gguf_path)} + {os.path.basename(lora_path)}"
    report = ParityReport(file=label, quant=quant)
    if not available():
        report.skipped = f"llama-cpp-python is not installed. Fix: {INSTALL_HINT}."
        return report
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    longest = max((len(tokenizer(p)["input_ids"]) for p in prompts), default=0)
    cpp = LlamaCpp(gguf_path, lora_path, n_ctx=max(256, 2 * (longest + max_new_tokens) + 128))
    cache = notebook_cache if notebook_cache is not None else {}
    try:
        for i, prompt in enumerate(prompts):
            key = (prompt, chat, max_new_tokens)
            if key not in cache:
                ids, _ = prompt_ids(tokenizer, prompt, chat, getattr(tokenizer, "chat_template", None))
                answer_ids, answer = notebook_answer(model, tokenizer, ids, max_new_tokens)
                cache[key] = (ids, answer_ids, answer, notebook_loglik(model, ids, answer_ids))
            ids, answer_ids, answer, ll_notebook = cache[key]
            _, file_text = prompt_ids(tokenizer, prompt, chat, cpp.chat_template)  # the template the file carries
            cpp_ids = cpp.tokenize(file_text, bos_text=tokenizer.bos_token)
            gguf_answer = cpp.detokenize(cpp.greedy(cpp_ids, max_new_tokens))
            report.rows.append(ParityRow(prompt, answer, gguf_answer, ll_notebook, cpp.mean_loglik(ids, answer_ids),
                                         cpp_ids == list(ids)))  # fmt: skip
            if progress is not None:
                progress(i + 1, len(prompts), prompt)
    finally:
        cpp.close()
    return report
