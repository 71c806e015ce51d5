"""Trying the model: text generation for language models, label prediction for classifiers."""

from __future__ import annotations


def format_prompt(tokenizer, prompt: str) -> str:
    """Wrap a plain prompt in the tokenizer's chat template when it has one (as training did)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    return prompt + "\n"


def generate(model, tokenizer, prompt, max_new_tokens=64, chat=True, **kw) -> str | list[str]:
    """Greedy by default; pass transformers generation kwargs (do_sample, temperature...) to change that."""
    import torch

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [format_prompt(tokenizer, p) if chat else p for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not _template_has_bos(tokenizer, texts))
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kw.setdefault("do_sample", False)
    kw.setdefault("pad_token_id", tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **kw)
    if was_training:
        model.train()
    if getattr(model.config, "is_encoder_decoder", False):
        new = out
    else:
        new = out[:, enc["input_ids"].shape[1]:]
    decoded = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return decoded[0] if isinstance(prompt, str) else decoded


def _template_has_bos(tokenizer, texts) -> bool:
    bos = tokenizer.bos_token
    return bool(bos) and all(t.startswith(bos) for t in texts)


def predict(model, tokenizer, texts, labels, max_length=256):
    """Predicted class names for one text or a list."""
    import torch

    single = isinstance(texts, str)
    batch = [texts] if single else list(texts)
    enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
    if was_training:
        model.train()
    ids = logits.argmax(-1).tolist()
    names = [labels[i] if labels is not None else i for i in ids]
    return names[0] if single else names
