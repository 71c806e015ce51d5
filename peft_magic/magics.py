"""IPython magics: a thin layer that parses the cell, calls the plain API and stores the result.

    %load_ext peft_magic
    %peft_model org/name --quantization 4bit
    %%peft_train run [--dry-run] [--set train.max_steps=10] [--config FILE] [--background] [--resume]
    %peft_export run ./my-adapter [--merge] [--overwrite] [--gguf q8_0] [--gguf-adapter] [--push-to-hub user/name]
    %peft_eval run [--data $df]        %peft_generate run "prompt"
    %peft_data run [-i 3] [-n 2]       the tokenized examples, trained tokens highlighted
    %peft_ui [run]                     a form over every key: Start / Stop / Export / Copy as cell

No training logic lives here. User mistakes surface as `UsageError` (one red line, no traceback).
"""

from __future__ import annotations

import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Unicode

from .errors import usage_errors


@magics_class
class PeftMagics(Magics):
    """`%config PeftMagics.display = 'none'` turns the live panel off (e.g. for headless runs)."""

    display = Unicode("auto", help="Live display: auto (panel in notebooks, lines elsewhere) or none.").tag(config=True)

    def __init__(self, shell=None, **kw):
        super().__init__(shell=shell, **kw)
        self.default_model: dict | None = None
        self.last_run_name: str | None = None

    # ---------------------------------------------------------------- %peft_model
    @magic_arguments()
    @argument("name_or_path", help="Hub id, local model folder or .gguf file.")
    @argument("--quantization", "-q", default="none", help="none | 4bit | 8bit")
    @argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    @argument("--trust-remote-code", action="store_true", help="Run code shipped with the model.")
    @line_magic
    @usage_errors
    def peft_model(self, line):
        """Set the session's base model (cells may then omit `model:`) and print what it is."""
        args = parse_argstring(self.peft_model, line)
        from .config.parse import build_section
        from .config.schema import ModelConfig

        raw = {"name_or_path": _unquote(args.name_or_path), "quantization": args.quantization, "dtype": args.dtype,
               "trust_remote_code": args.trust_remote_code}  # fmt: skip
        mcfg = build_section(ModelConfig, raw, "model")
        mcfg.validate()
        from . import models

        models.check_model_source(mcfg)
        models.check_quantization(mcfg)
        info = _describe_architecture(mcfg)
        self.default_model = {k: v for k, v in vars(mcfg).items() if v not in (None, False)}
        quant = "" if mcfg.quantization == "none" else f" · {mcfg.quantization}"
        print(f"base model: {mcfg.name_or_path}{' / ' + mcfg.gguf_file if mcfg.gguf_file else ''}{info}{quant}")

    # ---------------------------------------------------------------- %%peft_train
    @magic_arguments()
    @argument("name", nargs="?", default="run", help="Notebook variable that will hold the Run (default: run).")
    @argument("--dry-run", action="store_true", help="Print the resolved config and plan; train nothing.")
    @argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
              help="Override one key, e.g. --set train.max_steps=10 (repeatable).")  # fmt: skip
    @argument("--config", default=None, help="Read the YAML config from this file (the cell body is merged on top).")
    @argument("--background", action="store_true", help="Train in a thread; the cell returns at once.")
    @argument("--resume", action="store_true", help="Continue from the latest checkpoint of this run's folder.")
    @argument("--overwrite", action="store_true", help="Replace the earlier run this run's folder holds.")
    @argument("--processes", type=int, default=None, metavar="N",
              help="Train on N processes (one per GPU), started with accelerate's notebook_launcher.")  # fmt: skip
    @cell_magic
    @usage_errors
    def peft_train(self, line, cell):
        """Fine-tune with the YAML config in the cell body. See `peft_magic.config.schema` for every key."""
        args = parse_argstring(self.peft_train, line)
        if not args.name.isidentifier():
            raise UsageError(f"'{args.name}' is not a valid variable name. Fix: %%peft_train my_run")
        raw = _merge_sources(args.config, cell)
        defaults = {"model": dict(self.default_model)} if self.default_model else None
        ns = self.shell.user_ns if self.shell is not None else {}
        overrides = list(args.overrides)
        if args.processes is not None:
            overrides.append(f"train.num_processes={args.processes}")
        if args.dry_run:
            from .dryrun import dry_run

            plan = dry_run(raw, namespace=ns, defaults=defaults, name=args.name, overrides=overrides)
            print(plan.text())
            if plan.preview is not None:  # what is trained: HTML colours in a notebook, colours in a terminal
                from IPython.display import display

                display(plan.preview)
            return None
        from . import api
        from .errors import TrainingFailed

        previous = ns.get(args.name)
        try:  # a re-run frees the old model once the new cell passed its checks, before the new model loads
            run = api.train(raw, namespace=ns, background=args.background, name=args.name, display=self.display,
                            resume=args.resume, overwrite=args.overwrite, cell=_cell_text(line, cell),
                            overrides=overrides, defaults=defaults,
                            replaces=previous if _is_run(previous) else None)  # fmt: skip
        except TrainingFailed as e:  # NaN loss: keep the run (last good weights); out of memory: it has none
            if getattr(e, "run", None) is not None and e.run.model is not None:
                ns[args.name] = e.run
                self.last_run_name = args.name
            raise
        ns[args.name] = run
        self.last_run_name = args.name
        return None

    # ---------------------------------------------------------------- %peft_export
    @magic_arguments()
    @argument("words", nargs="*", help="[NAME] DIR")
    @argument("--merge", action="store_true", help="Write a full model with the adapter merged in.")
    @argument("--overwrite", action="store_true", help="Replace DIR if it already holds files.")
    @argument("--gguf", nargs="?", const="q8_0", default=None, metavar="QUANT",
              help="Also write the merged model as GGUF for llama.cpp/Ollama: f32 f16 bf16 q8_0 (default) q5_1 q5_0 "
                   "q4_1 q4_0 q4_k_m q5_k_m q6_k.")  # fmt: skip
    @argument("--gguf-adapter", action="store_true", help="Also write the LoRA as a GGUF adapter (llama.cpp --lora).")
    @argument("--no-parity", action="store_true", help="Skip comparing the GGUF with this model in llama.cpp.")
    @argument("--push-to-hub", default=None, metavar="USER/NAME", help="Upload the export to this Hub repo.")
    @argument("--private", action="store_true", help="With --push-to-hub: create the repo private.")
    @argument("--script", default=None, metavar="DIR",
              help="Instead: write DIR/config.yaml (+ its data as JSONL) and DIR/launch.sh to train on a cluster.")
    @argument("--processes", type=int, default=None, metavar="N",
              help="With --script: processes for launch.sh (default: the run's, else every GPU of the machine).")
    @line_magic
    @usage_errors
    def peft_export(self, line):
        """Export a run: `%peft_export [NAME] DIR [--merge] [--overwrite]`, or the cluster job that trains it again:
        `%peft_export [NAME] --script DIR [--processes N]`."""
        args = parse_argstring(self.peft_export, line)
        words = [_unquote(w) for w in args.words]
        if args.script:
            if len(words) > 1:
                raise UsageError("usage: %peft_export [NAME] --script DIR [--processes N] [--overwrite]")
            from .distributed.cluster import export_script

            run = self._run(words[0] if words else None)
            path = export_script(run, _unquote(args.script), namespace=self.shell.user_ns,
                                 num_processes=args.processes, overwrite=args.overwrite)  # fmt: skip
            print(f"wrote the cluster job of '{run.name}' to {path}: run `bash {path}/launch.sh` there")
            return None
        if args.push_to_hub and len(words) == 1 and _is_run(self.shell.user_ns.get(words[0])):
            words.append("./" + args.push_to_hub.strip().rstrip("/").split("/")[-1])  # NAME --push-to-hub: DIR from it
        if not words or len(words) > 2:
            raise UsageError("usage: %peft_export [NAME] DIR [--merge] [--overwrite] [--gguf QUANT] [--gguf-adapter] "
                             "[--push-to-hub USER/NAME [--private]]")  # fmt: skip
        name, out = (words if len(words) == 2 else (None, words[0]))
        run = self._run(name)
        path = run.export(out, merge=args.merge, overwrite=args.overwrite, gguf=args.gguf, gguf_adapter=args.gguf_adapter,
                          push_to_hub=args.push_to_hub, private=args.private, parity=not args.no_parity,
                          display=self.display, namespace=self.shell.user_ns)  # fmt: skip
        what = "merged model" if args.merge else "adapter"
        ggufs = [n for n in run.last_export.files if n.endswith(".gguf")]
        print(f"exported {what} of '{run.name}' to {path}" + (f" (+ {', '.join(ggufs)})" if ggufs else ""))
        if run.last_export.hub_url:
            print(f"pushed to {run.last_export.hub_url}")
        return None

    # ---------------------------------------------------------------- %%peft_compare
    @magic_arguments()
    @argument("name", nargs="?", default="comparison", help="Notebook variable that will hold the Comparison.")
    @argument("--dry-run", action="store_true", help="List the variants and check their configs; train nothing.")
    @argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
              help="Override one key of the base config, e.g. --set train.max_steps=50 (repeatable).")  # fmt: skip
    @argument("--config", default=None, help="Read the base YAML config from this file (the cell body is merged on top).")
    @cell_magic
    @usage_errors
    def peft_compare(self, line, cell):
        """Train the cell's config once per variant: `compare:` (a list of method specs) x `sweep:` (dotted keys
        -> lists of values), one after another; keeps a Comparison (.table, .runs, .plot_svg()) in NAME."""
        args = parse_argstring(self.peft_compare, line)
        if not args.name.isidentifier():
            raise UsageError(f"'{args.name}' is not a valid variable name. Fix: %%peft_compare my_comparison")
        from .comparison.plan import check, plan_text, plan_variants
        from .comparison.run import compare

        raw = _merge_sources(args.config, cell)
        defaults = {"model": dict(self.default_model)} if self.default_model else None
        ns = self.shell.user_ns if self.shell is not None else {}
        if args.dry_run:
            variants = plan_variants(raw, overrides=list(args.overrides), defaults=defaults, name=args.name)
            check(variants, args.name)
            print(plan_text(variants, args.name))
            return None
        result = compare(raw, namespace=ns, name=args.name, display=self.display, overrides=list(args.overrides),
                         defaults=defaults)  # fmt: skip
        ns[args.name] = result
        from IPython.display import display

        display(result)  # the table and the overlaid curves in a notebook, the table as text in a terminal
        return None

    # ---------------------------------------------------------------- %peft_eval / %peft_generate
    @magic_arguments()
    @argument("name", nargs="?", default=None, help="The run (default: the last one).")
    @argument("--data", default=None, help="Data source: $variable, file or hub id (default: the run's eval split).")
    @line_magic
    @usage_errors
    @no_var_expand  # `--data $df` names a notebook variable; IPython must not paste the DataFrame's text in
    def peft_eval(self, line):
        """Evaluate a run on its eval split or on --data; prints and returns the metrics."""
        args = parse_argstring(self.peft_eval, line)
        run = self._run(args.name)
        metrics = run.evaluate(_unquote(args.data) if args.data else None, namespace=self.shell.user_ns)
        from IPython.display import display

        display(metrics)  # a table + confusion matrix picture in a notebook, one line in a terminal
        return None  # the values are in run.metrics (and the last row of run.history)

    @magic_arguments()
    @argument("name", nargs="?", default=None, help="The run (default: the last one).")
    @argument("--example", "-i", type=int, default=0, help="Which tokenized example to show first (default 0).")
    @argument("-n", type=int, default=1, help="How many examples to show (default 1).")
    @argument("--eval", action="store_true", help="Show the eval split instead of train.")
    @line_magic
    @usage_errors
    def peft_data(self, line):
        """What a run trains on: its data format, chat template, lengths and cuts, and tokenized examples with the
        trained tokens highlighted (`run.data.preview(i)` in Python)."""
        args = parse_argstring(self.peft_data, line)
        run = self._run(args.name)
        if run.data is None:
            raise UsageError(f"'{run.name}' holds no prepared data (it was loaded from an export or failed before "
                             "tokenizing). Fix: `%%peft_train NAME --dry-run` shows the data of a cell.")  # fmt: skip
        from IPython.display import display

        display(run.data.preview(args.example, max(args.n, 1), "eval" if args.eval else "train"))
        return None

    @line_magic
    @usage_errors
    @no_var_expand  # a prompt is text: "$5" or "{x}" stay as written
    def peft_generate(self, line):
        """`%peft_generate [NAME] "prompt"`: the tuned model's answer next to the base model's."""
        words = shlex.split(line)
        if not words:
            raise UsageError('usage: %peft_generate [NAME] "prompt"')
        name, prompt = (words[0], " ".join(words[1:])) if len(words) > 1 and words[0] in self.shell.user_ns else (None, " ".join(words))  # fmt: skip
        run = self._run(name)
        from IPython.display import display

        from .report import generate_both

        display(generate_both(run, prompt))  # a two-column table in a notebook, plain lines in a terminal
        return None

    # ---------------------------------------------------------------- %peft_ui
    @magic_arguments()
    @argument("name", nargs="?", default=None,
              help="The run the form starts (default: run); if NAME already holds a run, its config fills the form.")
    @argument("--config", default=None, help="Fill the form from this YAML file.")
    @line_magic
    @usage_errors
    def peft_ui(self, line):
        """A form over every config key: Start / Stop / Export, and `Copy as cell` for the %%peft_train cell."""
        args = parse_argstring(self.peft_ui, line)
        name = args.name or "run"
        if not name.isidentifier():
            raise UsageError(f"'{name}' is not a valid variable name. Fix: %peft_ui my_run")
        previous = self.shell.user_ns.get(name)
        source = _unquote(args.config) if args.config else (previous.config if _is_run(previous) else None)
        defaults = {"model": dict(self.default_model)} if self.default_model else None
        from IPython.display import display

        from .ui.form import Form

        display(Form(source, name=name, shell=self.shell, defaults=defaults))
        return None

    # ---------------------------------------------------------------- helpers
    def _run(self, name):
        name = name or self.last_run_name or "run"
        run = self.shell.user_ns.get(name)
        if not _is_run(run):
            raise UsageError(f"'{name}' is not a training run. Fix: train one with %%peft_train {name}, or name it.")
        return run


def _is_run(obj) -> bool:
    from .run import Run

    return isinstance(obj, Run)


def _describe_architecture(mcfg) -> str:
    """' (LlamaForCausalLM, 135M params)' from the config alone (no weights), or '' when it cannot be built."""
    from . import models
    from .ui.format import format_count

    try:
        config = models.load_config(mcfg)
        empty = models.build_empty(mcfg, "causal-lm" if models.is_decoder(config) else "seq-cls")
    except OSError as e:  # its config cannot be read or fetched: never "base model: ..." for a model not found
        from .errors import ConfigError

        raise ConfigError(f"'{mcfg.name_or_path}' cannot be read as a model ({str(e).splitlines()[0]}). Fix: check "
                          "the hub id or the path.", key="model.name_or_path") from None  # fmt: skip
    except (ValueError, KeyError):
        return ""
    name = (getattr(config, "architectures", None) or [type(empty).__name__])[0]
    return f" ({name}, {format_count(models.count_parameters(empty)[1])} params)"


def _unquote(text):
    if text and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _merge_sources(config_path, cell):
    from .config.parse import load_mapping

    base = load_mapping(config_path) if config_path else {}
    body = load_mapping(cell) if cell and cell.strip() else {}
    for key, value in body.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def _cell_text(line, cell):
    return f"%%peft_train {line.strip()}\n{cell.strip()}\n".replace("%%peft_train \n", "%%peft_train\n")


def load_ipython_extension(ipython):
    ipython.register_magics(PeftMagics)

