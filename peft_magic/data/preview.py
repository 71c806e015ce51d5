"""Seeing what is trained: tokenized examples with the trained tokens highlighted, and the length figures.

`LengthStats` counts, per split, the tokens per example, the share trained, the rows cut by ``max_length`` and
the rows dropped because the cut took their whole answer (they would train on nothing). `Preview` shows examples:
HTML colours in a notebook, colour codes in a terminal, ``[[brackets]]`` around trained text in plain text.

    run.data.preview(0)          # the first training example
    %peft_data run               # the same from a magic, with the figures
"""

from __future__ import annotations

import html
import math
import sys
from dataclasses import dataclass, field

WARN_TRUNCATED = 0.03  # more than a few percent of rows cut: say so, with a length that keeps 95% whole
KEEP_SHARE = 0.95
_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


@dataclass
class LengthStats:
    """Length figures of one tokenized split.

    Attributes:
        rows: Rows tokenized (before any was dropped).
        max_length: The cut.
        truncated: Rows longer than max_length.
        dropped: Rows whose trained tokens were all cut away (removed from the split).
        tokens: Tokens kept, over the rows kept.
        trained: Of those, tokens the loss trains.
        mean_full: Mean tokens per row before the cut.
        max_full: Longest row before the cut.
        keep_whole: The max_length that keeps 95% of rows whole.
    """

    rows: int = 0
    max_length: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained: int = 0
    mean_full: float = 0.0
    max_full: int = 0
    keep_whole: int = 0

    @classmethod
    def measure(cls, full_lengths, kept_lengths, trained_counts, max_length: int) -> "LengthStats":
        """From each row's length before the cut, after it, and its trained-token count (after the cut)."""
        full = sorted(int(n) for n in full_lengths)
        n = len(full)
        dropped = sum(1 for t in trained_counts if t == 0)
        kept = [(k, t) for k, t in zip(kept_lengths, trained_counts) if t > 0]
        return cls(
            rows=n,
            max_length=max_length,
            truncated=sum(1 for f in full if f > max_length),
            dropped=dropped,
            tokens=sum(k for k, _ in kept),
            trained=sum(t for _, t in kept),
            mean_full=sum(full) / n if n else 0.0,
            max_full=full[-1] if full else 0,
            keep_whole=full[max(math.ceil(KEEP_SHARE * n) - 1, 0)] if full else 0,
        )

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.rows if self.rows else 0.0

    @property
    def trained_share(self) -> float:
        return self.trained / self.tokens if self.tokens else 0.0

    def summary(self) -> str:
        """One line: tokens per example, share trained, rows cut and dropped."""
        cut = (f"{self.truncated:,} of {self.rows:,} rows cut at max_length {self.max_length}" if self.truncated
               else f"none cut at max_length {self.max_length}")  # fmt: skip
        text = f"{self.mean_full:.0f} tokens/example (max {self.max_full:,}) · {self.trained_share:.0%} of tokens trained · {cut}"
        if self.dropped:
            text += f" · {self.dropped:,} dropped (the cut took their whole answer)"
        return text

    def warning(self) -> str | None:
        """The warning when more than a few percent of rows are cut, with the length that keeps 95% whole."""
        if self.truncated_share <= WARN_TRUNCATED:
            return None
        text = (f"{self.truncated_share:.0%} of rows are longer than max_length {self.max_length} and are cut"
                + (f" ({self.dropped:,} lost their whole answer and are dropped)" if self.dropped else ""))  # fmt: skip
        return f"{text}. Fix: `data.max_length: {self.keep_whole}` keeps {KEEP_SHARE:.0%} of rows whole."


@dataclass
class Example:
    """One tokenized example as (text, trained) segments."""

    index: int
    segments: list
    tokens: int
    trained: int
    full: int

    def header(self) -> str:
        share = self.trained / self.tokens if self.tokens else 0.0
        cut = f" · cut from {self.full:,}" if self.full > self.tokens else ""
        return f"example {self.index} · {self.tokens:,} tokens{cut} · {self.trained:,} trained ({share:.0%})"


def segments(tokenizer, input_ids, labels) -> list[tuple[str, bool]]:
    """Consecutive tokens grouped by whether they are trained, each group decoded (special tokens shown)."""
    groups: list[tuple[list, bool]] = []
    for tid, lab in zip(input_ids, labels):
        trained = lab != -100
        if groups and groups[-1][1] == trained:
            groups[-1][0].append(tid)
        else:
            groups.append(([tid], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), t)
            for ids, t in groups]  # fmt: skip


@dataclass
class Preview:
    """Examples with their trained tokens highlighted, plus the figures of the data they come from.

    `str()` marks trained text with ``[[ ]]``; in IPython's terminal colour codes are used; in a notebook HTML.
    """

    examples: list
    lines: dict = field(default_factory=dict)  # {label: text}: format, template, tokens...
    warning: str | None = None

    def text(self, color: bool = False) -> str:
        out = [f"{k:<10} {v}" for k, v in self.lines.items()]
        if self.warning:
            out.append(f"warning    {self.warning}")
        for ex in self.examples:
            out.append(f"── {ex.header()} " + ("(trained text in green)" if color else "(trained text in [[ ]])"))
            out.append("".join(_term(s, t, color) for s, t in ex.segments))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.text(color=False)

    def _repr_pretty_(self, p, cycle):
        p.text(self.text(color=_isatty()))

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td style='padding-right:1em;color:#666'>{html.escape(k)}</td><td>{html.escape(str(v))}"
                       "</td></tr>" for k, v in self.lines.items())  # fmt: skip
        warn = (f"<div style='color:#b45309'>&#9888; {html.escape(self.warning)}</div>" if self.warning else "")
        blocks = "".join(
            f"<div style='margin-top:.5em;color:#666'>{html.escape(ex.header())}</div>"
            "<pre style='white-space:pre-wrap;margin:.2em 0;padding:.4em;border:1px solid #ddd'>"
            + "".join(_html(s, t) for s, t in ex.segments) + "</pre>"
            for ex in self.examples
        )
        legend = ("<div style='font-size:85%;color:#666'>highlighted: trained (in the loss) · grey: context only"
                  "</div>")  # fmt: skip
        return f"<div class='peft-preview'><table>{rows}</table>{warn}{blocks}{legend if self.examples else ''}</div>"


def _term(text, trained, color) -> str:
    text = text.replace("\n", "↵\n")
    if not trained:
        return f"{_DIM}{text}{_RESET}" if color else text
    return f"{_GREEN}{text}{_RESET}" if color else f"[[{text}]]"


def _html(text, trained) -> str:
    body = html.escape(text).replace("\n", "<span style='opacity:.5'>↵</span>\n")
    if trained:
        return f"<span style='background:#bbf7d0;color:#14532d' title='trained'>{body}</span>"
    return f"<span style='color:#6b7280'>{body}</span>"


def _isatty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def finish(ds, max_length: int):
    """Measure a tokenized split (`chat.tokenize_rows`), drop the rows that train on nothing, remove the figures'
    columns. Returns (dataset, `LengthStats` or None, each kept row's length before the cut or None)."""
    if "n_full" not in ds.column_names:  # a task without answers to lose (classification, seq2seq)
        return ds.filter(lambda r: len(r["input_ids"]) > 0), None, None
    full, trained = list(ds["n_full"]), list(ds["n_trained"])
    stats = LengthStats.measure(full, [min(n, max_length) for n in full], trained, max_length)
    keep = [i for i, t in enumerate(trained) if t > 0]
    if len(keep) < len(ds):
        ds = ds.select(keep)
    return ds.remove_columns(["n_full", "n_trained"]), stats, [full[i] for i in keep]


def make_preview(prepared, indices=(0,), split="train") -> Preview:
    """A `Preview` of `prepared`'s examples `indices` (of the tokenized `split`), with the split's figures."""
    from ..errors import ConfigError

    ds = prepared.train if split == "train" else prepared.eval
    if ds is None:
        raise ConfigError("this run has no eval data to preview.", key="data.eval")
    tokenizer = prepared.tokenizer
    examples = []
    for i in indices:
        if not -len(ds) <= i < len(ds):
            raise ConfigError(f"there is no example {i}: the {split} split has {len(ds):,}. Fix: pick 0 to "
                              f"{len(ds) - 1}.", key="preview")  # fmt: skip
        i = i % len(ds)
        row = ds[i]
        ids, labels = list(row["input_ids"]), list(row.get("labels") or row["input_ids"])
        full = prepared.full_lengths[split][i] if prepared.full_lengths.get(split) else len(ids)
        trained = sum(1 for lab in labels if lab != -100)
        examples.append(Example(i, segments(tokenizer, ids, labels), len(ids), trained, full))
    stats = prepared.stats.get(split)
    return Preview(examples, lines=split_summary(prepared, split), warning=stats.warning() if stats else None)


def split_summary(prepared, split="train") -> dict:
    """The figures shown above examples, in the dry run and by `%peft_data`."""
    lines = {}
    if prepared.format_note:
        lines["format"] = prepared.format_note
    if prepared.template_note:
        lines["template"] = prepared.template_note
    stats = prepared.stats.get(split)
    if stats is not None:
        lines["tokens"] = stats.summary()
    return lines
