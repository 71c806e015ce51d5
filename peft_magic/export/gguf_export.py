"""GGUF files, the parity check and the Hub as part of an export (`run.export(dir, gguf=..., gguf_adapter=...,
push_to_hub=...)`, `%peft_export`, the CLI's ``--export DIR --gguf q8_0`` and the form's Export button).

Every option is checked before any work (`check_options`). The GGUF files, their Ollama Modelfiles and the parity
check are written inside the export's temporary folder, so the whole export appears at once or not at all; the
push to the Hub follows the rename, and when it fails the local export stays. `run.last_export` keeps what was
written (`ExportResult`), the parity reports included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import ConfigError

PARITY_TOKENS = 24  # new tokens per parity prompt: enough to see the style, short enough for a CPU
PARITY_PROMPTS = 3


@dataclass
class ExportOptions:
    """The checked request: merged GGUF quantization (a `gguf.quant.Quant` or None), adapter GGUF, parity, Hub."""

    quant: object = None
    adapter: bool = False
    parity: bool = True
    prompts: list | None = None
    push_to_hub: str | None = None
    private: bool = False

    @property
    def any_gguf(self) -> bool:
        return self.quant is not None or self.adapter


class ParityReports(list):
    """The parity reports of an export (merged and/or adapter file), shown together."""

    @property
    def ok(self) -> bool:
        return bool(self) and all(r.ok for r in self)

    def text(self) -> str:
        return "\n\n".join(r.text() for r in self)

    def _repr_html_(self) -> str:
        return "".join(r._repr_html_() for r in self)


@dataclass
class ExportResult:
    """What an export wrote (`run.last_export`): the folder, each file with what it is, the parity reports, the
    Hub URL."""

    folder: str
    files: dict = field(default_factory=dict)  # file name -> what it is
    parity: ParityReports = field(default_factory=ParityReports)
    hub_url: str | None = None

    def text(self) -> str:
        lines = [f"exported to {self.folder}:"]
        lines += [f"  {name:<34} {what}" for name, what in self.files.items()]
        if self.parity:
            lines += ["", self.parity.text()]
        if self.hub_url:
            lines.append(f"pushed to {self.hub_url}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(f"<tr><td><code>{escape(n)}</code></td><td>{escape(w)}</td></tr>" for n, w in self.files.items())
        hub = f"<p>pushed to <a href='{escape(self.hub_url)}'>{escape(self.hub_url)}</a></p>" if self.hub_url else ""
        return (f"<div><b>exported</b> to <code>{escape(self.folder)}</code><table>{rows}</table>"
                f"{self.parity._repr_html_()}{hub}</div>")  # fmt: skip


def check_options(run, gguf=None, gguf_adapter=False, push_to_hub=None, private=False, parity=True,
                  prompts=None) -> ExportOptions:  # fmt: skip
    """Refuse, in one line and before anything is written, what cannot be exported."""
    from ..gguf.quant import parse_quant, require_gguf

    opts = ExportOptions(adapter=bool(gguf_adapter), parity=parity, private=bool(private))
    if gguf not in (None, False) or opts.adapter:
        require_gguf()
    if gguf not in (None, False):
        opts.quant = parse_quant(gguf)
    if opts.any_gguf:
        if run.config.task != "causal-lm":
            raise ConfigError(f"GGUF export is for causal-lm runs (llama.cpp runs text generators); this run's task "
                              f"is {run.config.task}. Fix: export without --gguf.", key="gguf")  # fmt: skip
        from ..gguf.merged import check_model

        check_model(base_config(run.model), run.tokenizer)
        if opts.adapter:
            from ..gguf.lora import check_adapter

            check_adapter(run.model)
    if prompts is not None:
        opts.prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if push_to_hub:
        from .hub import check_push

        opts.push_to_hub = check_push(push_to_hub)
    return opts


def base_config(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def is_chat(run) -> bool:
    """Whether prompts get the chat template, as `run.generate` decides."""
    return run.data is None or run.data.kind in ("instruction", "chat")


def write_gguf_files(run, folder: str, opts: ExportOptions, merged_model, progress) -> dict:
    """Write the requested GGUF files and their Modelfiles into `folder`; returns {file name: what it is}.

    `merged_model()` gives the run's model with its adapter folded in (full precision).
    """
    from ..gguf.lora import base_state_dict, write_lora_gguf
    from ..gguf.merged import write_merged_gguf
    from ..gguf.ollama import modelfile
    from ..gguf.vocab import source_gguf_path

    files = {}
    source = source_gguf_path(run.config.model)
    chat = is_chat(run)
    if opts.quant is not None:
        name = f"{run.name}-{opts.quant.name}.gguf"
        model = merged_model()
        write_merged_gguf(model, run.tokenizer, os.path.join(folder, name), opts.quant, source_gguf=source,
                          name=run.name, progress=progress.stage(f"writing {name}"))  # fmt: skip
        del model
        files[name] = f"merged model, {opts.quant.name} (llama.cpp, Ollama, LM Studio)"
        _write_text(folder, "Modelfile", modelfile(run.tokenizer, f"./{name}", chat=chat, name=run.name))
        files["Modelfile"] = f"Ollama: ollama create {run.name} -f Modelfile"
    if opts.adapter:
        name = f"{run.name}-adapter.gguf"
        write_lora_gguf(run.model, os.path.join(folder, name), name=run.name,
                        progress=progress.stage(f"writing {name}"))  # fmt: skip
        files[name] = "LoRA adapter as GGUF (llama.cpp --lora, Ollama ADAPTER), for the base GGUF"
        if source:
            base_ref = source
        else:  # trained from a transformers model: write the base the adapter applies to
            base_quant = opts.quant.name if opts.quant is not None and not opts.quant.k_quant else "f16"
            base_name = f"base-{base_quant}.gguf"
            write_merged_gguf(run.model, run.tokenizer, os.path.join(folder, base_name), base_quant,
                              name=f"{run.name}-base", state=base_state_dict(run.model),
                              progress=progress.stage(f"writing {base_name}"))  # fmt: skip
            files[base_name] = f"the base model, {base_quant}, which {name} applies to"
            base_ref = f"./{base_name}"
        modelfile_name = "Modelfile.adapter" if opts.quant is not None else "Modelfile"
        _write_text(folder, modelfile_name, modelfile(run.tokenizer, base_ref, f"./{name}", chat=chat,
                                                      name=f"{run.name}-lora", file=modelfile_name))  # fmt: skip
        files[modelfile_name] = f"Ollama: ollama create {run.name}-lora -f {modelfile_name}"
    return files


def _write_text(folder: str, name: str, text: str) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
        fh.write(text)


def default_prompts(run, n: int = PARITY_PROMPTS, namespace=None) -> list[str]:
    """The first `n` user prompts of the run's eval data (its train data when it has none); [] when they cannot
    be read back (the parity check then asks for `prompts=`)."""
    from ..data.prepare import resolve, shape_rows
    from ..models import quiet_loading

    dcfg = run.config.data
    try:
        held_out = isinstance(dcfg.eval, float)
        src = dcfg.train if dcfg.eval is None or held_out else dcfg.eval
        with quiet_loading():  # no "Map: 100%" bar from datasets under the export's own bar
            ds = resolve(src, namespace, "data.eval")
            ds, kind, _ = shape_rows(ds, dcfg, run.config.task, "data.eval")
        if held_out:
            ds = ds.train_test_split(test_size=dcfg.eval, seed=run.config.train.seed)["test"]
    except (ConfigError, ValueError, KeyError, OSError, TypeError):
        return []
    out = []
    for row in ds.select(range(min(len(ds), 4 * n))):
        if "messages" in row:
            text = next((m["content"] for m in row["messages"] if m.get("role") == "user"), None)
        else:
            text = row.get("prompt")
        if isinstance(text, str) and text.strip() and text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def run_parity(run, folder: str, files: dict, opts: ExportOptions, progress, namespace=None) -> ParityReports:
    """The parity check of each GGUF written (merged, and base + adapter)."""
    from ..gguf.parity import ParityReport, available, check_parity
    from ..gguf.vocab import source_gguf_path

    reports = ParityReports()
    if not opts.parity or not opts.any_gguf:
        return reports
    targets = []  # (model file, adapter file or None, quant label)
    for name in files:
        if name.endswith(".gguf") and not name.startswith("base-") and not name.endswith("-adapter.gguf"):
            targets.append((os.path.join(folder, name), None, opts.quant.name))
    adapter = next((n for n in files if n.endswith("-adapter.gguf")), None)
    if adapter:
        base = next((n for n in files if n.startswith("base-")), None)
        base_path = os.path.join(folder, base) if base else source_gguf_path(run.config.model)
        label = base[len("base-"):-len(".gguf")] if base else _file_type(base_path)
        targets.append((base_path, os.path.join(folder, adapter), label))
    if not available():
        report = ParityReport(file=os.path.basename(targets[0][0]))
        report.skipped = check_parity(run.model, run.tokenizer, targets[0][0], []).skipped
        reports.append(report)
        return reports
    prompts = opts.prompts or default_prompts(run, namespace=namespace)
    if not prompts:
        report = ParityReport(file=os.path.basename(targets[0][0]))
        report.skipped = ("no prompts to compare (the run's data could not be read back). Fix: give some, e.g. "
                          "run.export(..., prompts=['...']).")  # fmt: skip
        reports.append(report)
        return reports
    cache = {}  # the notebook model's answers, computed once for all files
    for model_path, lora_path, quant in targets:
        what = os.path.basename(lora_path or model_path)
        reports.append(check_parity(run.model, run.tokenizer, model_path, prompts, lora_path=lora_path,
                                    chat=is_chat(run), max_new_tokens=PARITY_TOKENS, quant=quant,
                                    progress=progress.stage(f"parity of {what}", len(prompts)),
                                    notebook_cache=cache))  # fmt: skip
    return reports


def _file_type(path: str) -> str | None:
    """The quantization of a GGUF file, from its `general.file_type` (e.g. 'q4_1')."""
    import gguf

    from ..gguf.vocab import read_field

    try:
        value = read_field(path, "general.file_type")
        return gguf.LlamaFileType(int(value)).name.replace("MOSTLY_", "").replace("ALL_", "").lower()
    except (ValueError, TypeError, OSError):
        return None


def card_lines(run, files: dict, reports: ParityReports) -> list[str]:
    """The model card's section on the GGUF files: how to run each with llama.cpp and Ollama, and the parity
    table measured at export time."""
    ggufs = [n for n in files if n.endswith(".gguf")]
    if not ggufs:
        return []
    merged = [n for n in ggufs if not n.startswith("base-") and not n.endswith("-adapter.gguf")]
    adapter = next((n for n in ggufs if n.endswith("-adapter.gguf")), None)
    base = next((n for n in ggufs if n.startswith("base-")), None)
    from ..gguf.vocab import source_gguf_path

    base_file = base or os.path.basename(source_gguf_path(run.config.model) or "BASE.gguf")
    lines = ["## Run it with llama.cpp or Ollama", ""]
    if merged:
        lines += [f"`{merged[0]}` holds the whole model (adapter merged in), its tokenizer and chat template:", "",
                  "```bash", f"llama-cli -m {merged[0]} -cnv --temp 0",
                  f"ollama create {run.name} -f Modelfile && ollama run {run.name}", "```", ""]  # fmt: skip
        lines += ["```python", "from llama_cpp import Llama",
                  f"llm = Llama(model_path={merged[0]!r})",
                  "llm.create_chat_completion([{'role': 'user', 'content': 'Hello'}], temperature=0)", "```", ""]  # fmt: skip
    if adapter:
        mf = "Modelfile.adapter" if merged else "Modelfile"
        where = "written beside it" if base else f"the file the run trained from ({run.config.model.name_or_path})"
        lines += [f"`{adapter}` is the LoRA alone; it applies to the base GGUF `{base_file}` ({where}):", "",
                  "```bash", f"llama-cli -m {base_file} --lora {adapter} -cnv --temp 0",
                  f"ollama create {run.name}-lora -f {mf} && ollama run {run.name}-lora", "```", ""]  # fmt: skip
    for report in reports:
        lines += _parity_markdown(report)
    return lines


def _parity_markdown(report) -> list[str]:
    if report.skipped:
        return [f"Parity with the notebook model was not checked: {report.skipped}", ""]
    lines = [f"### Parity: `{os.path.basename(report.file)}` in llama.cpp vs the notebook model (greedy)", "",
             "| prompt | notebook answer | GGUF answer | agree | log-lik/token notebook | log-lik/token GGUF |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in report.rows:
        cells = [_md(r.prompt), _md(r.notebook), _md(r.gguf), "yes" if r.agree else "**no**",
                 f"{r.ll_notebook:.3f}", f"{r.ll_gguf:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", report.verdict, ""]


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def show(reports: ParityReports, display: str = "auto") -> None:
    """The parity tables: HTML in a notebook, text in a terminal, nothing with ``display="none"``."""
    if display == "none" or not reports:
        return
    from ..ui import in_notebook

    if display == "panel" or (display == "auto" and in_notebook()):
        from IPython.display import display as ipy_display

        ipy_display(reports)
    else:
        print(reports.text())


def export_with_gguf(run, out_dir: str, *, merge=False, overwrite=False, gguf=None, gguf_adapter=False,
                     push_to_hub=None, private=False, parity=True, prompts=None, display="auto",
                     namespace=None) -> ExportResult:  # fmt: skip
    """The whole export: checks, the folder (adapter or merged model) with the GGUF files inside, parity, card,
    atomic rename, then the Hub. See `peft_magic.run.Run.export`."""
    from .folder import export_run, merged_model
    from .progress import NoProgress, make_progress

    opts = check_options(run, gguf, gguf_adapter, push_to_hub, private, parity, prompts)
    result = ExportResult(folder="")
    progress = make_progress(display) if opts.any_gguf else NoProgress()

    def extra(tmp: str) -> list[str]:
        if not opts.any_gguf:
            return []
        written = write_gguf_files(run, tmp, opts, lambda: merged_model(run), progress)
        result.parity = run_parity(run, tmp, written, opts, progress, namespace)
        for report in result.parity:  # name the file as it will be, not in the temporary folder
            report.file = report.file.replace(tmp + os.sep, "")
        return card_lines(run, written, result.parity)

    try:
        result.folder = export_run(run, out_dir, merge=merge, overwrite=overwrite, extra=extra)
    finally:
        progress.close()
    from .files_section import describe_files

    result.files = describe_files(result.folder)
    run.last_export = result  # kept even when the push below fails
    show(result.parity, display)
    if opts.push_to_hub:
        from .hub import push_folder

        result.hub_url = push_folder(result.folder, opts.push_to_hub, private=opts.private,
                                     message=f"{run.name}: exported by peft_magic")  # fmt: skip
    return result
