"""The shapes instruction data comes in, detected from the columns and mapped onto one form.

| format | columns | becomes |
| --- | --- | --- |
| `messages` (OpenAI / TRL conversational) | `messages`: [{role, content}, ...], `system` turns allowed | a conversation |
| `sharegpt` | `conversations`: [{from, value}, ...], from = human / gpt / system | a conversation |
| `alpaca` | `instruction`, optional `input`, `output` | user: instruction + input, assistant: output |
| `prompt_completion` (TRL) | `prompt`, `completion`: strings (plain) or message lists (conversational) | plain: text continued by the completion; conversational: a conversation whose completion alone is trained |
| `prompt_response` | `prompt`, `response` (names set by `data.prompt_column` / `data.response_column`) | user: prompt, assistant: response |
| `text` | `text` (`data.text_column`) | plain text, every token trained |

When several fit (alpaca datasets often carry a pre-rendered `text` column too), the first of the table wins and
`Detected.note` says which was chosen and how to pick another (`data.format: NAME`).

Conversations are normalised (before the train/eval split, so a message names the row of the user's data) into a
`messages` column of {role, content} dicts, `n_context` (leading messages never trained: the prompt of a
conversational prompt/completion row) and `source_row`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..config.schema import DATA_FORMAT_ALIASES, DATA_FORMATS
from ..errors import ConfigError, did_you_mean

FORMATS = DATA_FORMATS[1:]  # in order of preference when several fit
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "system": "system"}  # fmt: skip
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_COLUMN = "conversations"


@dataclass
class Detected:
    """The data format chosen for a dataset.

    Attributes:
        name: One of `FORMATS`.
        kind: How it is tokenized: ``text``, ``instruction`` (one prompt, one answer), ``chat`` (a conversation)
            or ``completion`` (plain prompt text continued by the completion).
        columns: The columns read.
        others: Other formats the columns would also fit.
        chosen_by: ``auto`` or ``data.format``.
    """

    name: str
    kind: str
    columns: tuple
    others: tuple = ()
    chosen_by: str = "auto"

    @property
    def note(self) -> str:
        """One line for the dry run: which format, from which columns, and how to choose another."""
        text = f"{self.name} ({', '.join(self.columns)})"
        if self.others and self.chosen_by == "auto":
            alt = self.others[0]
            text += f"; also fits {', '.join(self.others)}: set `data.format: {alt}` to use {'that' if len(self.others) == 1 else 'another'}"  # fmt: skip
        return text


def canonical_name(name) -> str:
    """`data.format` as given -> a name of `FORMATS` (or ``auto``)."""
    text = str(name or "auto").strip().lower().replace("-", "_").replace("/", "_")
    text = DATA_FORMAT_ALIASES.get(text, text)
    if text != "auto" and text not in FORMATS:
        raise ConfigError(f"unknown data format '{name}'.{did_you_mean(text, FORMATS)} Fix: one of auto, "
                          f"{', '.join(FORMATS)}.", key="data.format")  # fmt: skip
    return text


# ---------------------------------------------------------------- detecting


def _first_value(ds, col):
    """The first non-empty value of a column (a peek, to tell message dicts' key styles apart)."""
    for i in range(min(len(ds), 20)):
        value = ds[i][col]
        if value:
            return value
    return None


def _message_style(value) -> str | None:
    """'sharegpt' for [{from, value}], 'messages' for [{role, content}], None otherwise."""
    if isinstance(value, str):
        value = _json_list(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
        if "from" in value[0] and "value" in value[0]:
            return "sharegpt"
        if "role" in value[0]:
            return "messages"
    return None


def _json_list(text):
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, list) else None


def candidates(ds, dcfg) -> list[tuple[str, tuple]]:
    """Every format the dataset's columns fit, in order of preference, with the columns each would read."""
    cols = set(ds.column_names)
    found = []
    for col in dict.fromkeys((dcfg.messages_column, SHAREGPT_COLUMN, "messages")):
        if col in cols:
            style = _message_style(_first_value(ds, col)) or ("sharegpt" if col == SHAREGPT_COLUMN else "messages")
            if all(name != style for name, _ in found):
                found.append((style, (col,)))
    if {"instruction", "output"} <= cols:
        found.append(("alpaca", ("instruction", "input", "output") if "input" in cols else ("instruction", "output")))
    if {"prompt", "completion"} <= cols:
        found.append(("prompt_completion", ("prompt", "completion")))
    if {dcfg.prompt_column, dcfg.response_column} <= cols:
        found.append(("prompt_response", (dcfg.prompt_column, dcfg.response_column)))
    if dcfg.text_column in cols:
        found.append(("text", (dcfg.text_column,)))
    order = {name: i for i, name in enumerate(FORMATS)}
    return sorted(found, key=lambda f: order[f[0]])


def detect(ds, dcfg, key="data.train") -> Detected:
    """The format of `ds` (`data.format` when set, else the first that fits).

    Raises:
        ConfigError: no format fits the columns, or the chosen one does not.
    """
    wanted = canonical_name(getattr(dcfg, "format", "auto"))
    found = candidates(ds, dcfg)
    cols = [str(c) for c in ds.column_names]
    if {"chosen", "rejected"} <= set(cols) and not found:
        raise ConfigError("this is preference data (chosen/rejected pairs, for DPO); peft_magic trains on "
                          "answers. Fix: train on the preferred answers with `data: {response_column: chosen}`.", key=key)  # fmt: skip
    if wanted != "auto":
        match = [f for f in found if f[0] == wanted]
        if not match:
            raise ConfigError(f"`data.format: {wanted}` needs {_needs(wanted, dcfg)}, but the columns are "
                              f"{', '.join(cols)}. Fix: rename the columns, or remove `data.format` to detect it.",
                              key="data.format")  # fmt: skip
        name, columns = match[0]
        return Detected(name, _kind(name, ds, columns), columns, chosen_by="data.format")
    if not found:
        raise ConfigError(f"no column '{dcfg.text_column}' (columns: {', '.join(cols)}).{did_you_mean(dcfg.text_column, cols)} "
                          "Fix: rename the column or set `data.text_column: <name>`; instruction data needs "
                          "`prompt`/`response` (or `data.prompt_column` / `data.response_column`), "
                          "`instruction`/`output` (alpaca), `messages` (role/content) or `conversations` "
                          "(ShareGPT).", key=key)  # fmt: skip
    (name, columns), others = found[0], tuple(f[0] for f in found[1:])
    return Detected(name, _kind(name, ds, columns), columns, others=others)


def _needs(name, dcfg) -> str:
    return {
        "messages": f"a '{dcfg.messages_column}' column of {{role, content}} lists",
        "sharegpt": f"a '{SHAREGPT_COLUMN}' column of {{from, value}} lists",
        "alpaca": "'instruction' and 'output' columns (and optionally 'input')",
        "prompt_completion": "'prompt' and 'completion' columns",
        "prompt_response": f"'{dcfg.prompt_column}' and '{dcfg.response_column}' columns",
        "text": f"a '{dcfg.text_column}' column",
    }[name]


def _kind(name, ds, columns) -> str:
    if name in ("messages", "sharegpt"):
        return "chat"
    if name == "prompt_completion":
        first = _first_value(ds, "prompt")
        return "chat" if isinstance(first, (list, tuple)) else "completion"
    return {"alpaca": "instruction", "prompt_response": "instruction"}.get(name, "text")


# ---------------------------------------------------------------- normalising


def normalize(ds, detected: Detected, train_on: str = "assistant", key="data.train"):
    """Map a conversational or prompt/answer dataset onto ``messages`` / ``n_context`` / ``source_row`` columns
    (``prompt`` / ``completion`` / ``source_row`` for plain prompt/completion); text data is returned as is.

    Every row is checked here, before any split, so an error names the row of the user's data.
    """
    if detected.kind == "text":
        return ds
    convert = _converter(detected, train_on, key)

    def batch(rows, indices):
        out = [convert({c: rows[c][j] for c in rows}, i) for j, i in enumerate(indices)]
        return {k: [o[k] for o in out] for k in out[0]} if out else {}

    return ds.map(batch, batched=True, with_indices=True, remove_columns=list(ds.column_names), desc=None)


def _converter(detected, train_on, key):
    name, cols = detected.name, detected.columns
    if name == "prompt_completion" and detected.kind == "completion":
        return lambda row, i: {"prompt": text_value(row["prompt"], i, "prompt", key),
                               "completion": text_value(row["completion"], i, "completion", key), "source_row": i}  # fmt: skip

    def convert(row, i):
        if name == "messages":
            messages, n_context = message_list(row[cols[0]], i, cols[0], key), 0
        elif name == "sharegpt":
            messages, n_context = _sharegpt(row[cols[0]], i, cols[0], key), 0
        elif name == "prompt_completion":
            prompt = message_list(row["prompt"], i, "prompt", key)
            messages, n_context = prompt + message_list(row["completion"], i, "completion", key), len(prompt)
        else:
            messages, n_context = _single_turn(row, name, cols, i, key), 0
        check_conversation(messages, i, train_on, key)
        return {"messages": messages, "n_context": n_context, "source_row": i}

    return convert


def _single_turn(row, name, cols, i, key) -> list:
    if name == "alpaca":
        prompt = text_value(row["instruction"], i, "instruction", key)
        extra = row.get("input")
        if extra is not None and str(extra).strip():
            prompt = f"{prompt}\n\n{text_value(extra, i, 'input', key)}"
        answer = text_value(row["output"], i, "output", key)
    else:
        prompt, answer = text_value(row[cols[0]], i, cols[0], key), text_value(row[cols[1]], i, cols[1], key)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def text_value(value, i, col, key) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise ConfigError(f"row {i}: column '{col}' is empty. Fix: fill or drop that row.", key=key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"row {i}: column '{col}' holds a {type(value).__name__}, not text. Fix: convert the column "
                      "to strings.", key=key)  # fmt: skip


def _as_list(value, i, col, key, shape):
    if value is None:
        return []
    if isinstance(value, str) and _json_list(value) is not None:
        return _json_list(value)  # a CSV cell holding the list as JSON text
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value):
        return list(value)
    if isinstance(value, (list, tuple)):
        got = f"a list of {type(next(m for m in value if not isinstance(m, dict))).__name__}"
    else:
        got = f"a {type(value).__name__}"
    raise ConfigError(f"row {i}: column '{col}' holds {got}, not a list of {shape} messages. Fix: give each row a "
                      f"list like [{_example(shape)}], or set `data.format` / the column settings to read another "
                      "column.", key=key)  # fmt: skip


def _example(shape) -> str:
    return "{'from': 'human', 'value': '...'}, {'from': 'gpt', 'value': '...'}" if shape == "{from, value}" else \
        "{'role': 'user', 'content': '...'}, {'role': 'assistant', 'content': '...'}"  # fmt: skip


def message_list(value, i, col, key) -> list:
    out = []
    for j, m in enumerate(_as_list(value, i, col, key, "{role, content}")):
        if "role" not in m or "content" not in m:
            missing = "role" if "role" not in m else "content"
            raise ConfigError(f"row {i}, message {j}: no '{missing}' key (keys: {', '.join(map(str, m))}). Fix: "
                              "each message needs 'role' and 'content'.", key=key)  # fmt: skip
        role = str(m["role"]).strip().lower()
        if role not in MESSAGE_ROLES:
            raise ConfigError(f"row {i}, message {j}: unknown role '{m['role']}'.{did_you_mean(role, MESSAGE_ROLES)} "
                              f"Fix: use one of {', '.join(MESSAGE_ROLES)}.", key=key)  # fmt: skip
        out.append({"role": role, "content": _content(m["content"], i, j, key)})
    return out


def _content(value, i, j, key) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) and all(isinstance(p, dict) for p in value):  # OpenAI content parts
        if all(p.get("type", "text") == "text" for p in value):
            return "".join(str(p.get("text", "")) for p in value)
        kinds = sorted({str(p.get("type")) for p in value} - {"text"})
        raise ConfigError(f"row {i}, message {j}: holds {', '.join(kinds)} parts; only text is trained. Fix: "
                          "drop those parts or those rows.", key=key)  # fmt: skip
    raise ConfigError(f"row {i}, message {j}: 'content' is a {type(value).__name__}, not text. Fix: give the "
                      "message's text as a string.", key=key)  # fmt: skip


def _sharegpt(value, i, col, key) -> list:
    out = []
    for j, m in enumerate(_as_list(value, i, col, key, "{from, value}")):
        # rows given as dicts become Arrow structs: a key missing from one turn reads as None there
        missing = [k for k in ("from", "value") if m.get(k) is None]
        if missing:
            keys = ", ".join(str(k) for k, v in m.items() if v is not None) or "none"
            raise ConfigError(f"row {i}, turn {j}: no '{missing[0]}' in this ShareGPT turn (keys: {keys}). Fix: give "
                              "each turn {'from': 'human' | 'gpt' | 'system', 'value': '...'}.", key=key)  # fmt: skip
        who = str(m["from"]).strip().lower()
        if who not in SHAREGPT_ROLES:
            raise ConfigError(f"row {i}, turn {j}: unknown ShareGPT role '{m['from']}'.{did_you_mean(who, SHAREGPT_ROLES)} "
                              f"Fix: use human, gpt or system (e.g. map it in pandas before training).", key=key)  # fmt: skip
        out.append({"role": SHAREGPT_ROLES[who], "content": _content(m["value"], i, j, key)})
    return out


def check_conversation(messages, i, train_on="assistant", key="data.train") -> None:
    """A conversation that can be trained: not empty, and (unless every token is trained) ending in an answer."""
    if not messages:
        raise ConfigError(f"row {i}: the conversation is empty. Fix: drop rows without messages.", key=key)
    if train_on != "all" and messages[-1]["role"] != "assistant":
        raise ConfigError(f"row {i}: the conversation ends with a {messages[-1]['role']} turn, so its last "
                          "message has no answer to learn. Fix: end it with the assistant's reply, or drop that "
                          "last turn.", key=key)  # fmt: skip
