"""Command line: the same `train()` as the notebook, for terminals, scripts and `accelerate launch`.

    peft-magic train CONFIG.yaml [--set train.max_steps=10 ...] [--dry-run] [--export DIR] [--merge]
                     [--gguf q8_0] [--gguf-adapter] [--push-to-hub USER/NAME [--private]]
    peft-magic quickstart [--model ID] [--steps N]     # the README's offline demo (see quickstart.py)
    accelerate launch -m peft_magic train CONFIG.yaml
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-magic", description="Parameter-efficient fine-tuning from a YAML config.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="Train from a YAML config (the same keys as a %%peft_train cell).")
    t.add_argument("config", help="YAML file.")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one key, e.g. --set train.max_steps=10 (repeatable).")  # fmt: skip
    t.add_argument("--name", default="run", help="Run name (default output folder peft_runs/NAME).")
    t.add_argument("--dry-run", action="store_true", help="Print the plan; train nothing.")
    t.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint.")
    t.add_argument("--export", default=None, metavar="DIR", help="Export the adapter here after training.")
    t.add_argument("--merge", action="store_true", help="With --export: write a merged full model.")
    t.add_argument("--overwrite", action="store_true", help="Replace the earlier run in the output folder (and, with --export, DIR if it holds files); "
                        "with --resume, only DIR (the run continues).")  # fmt: skip
    t.add_argument("--gguf", nargs="?", const="q8_0", default=None, metavar="QUANT",
                   help="With --export: also the merged model as GGUF (f32 f16 bf16 q8_0 q5_1 q5_0 q4_1 q4_0 q4_k_m "
                        "q5_k_m q6_k; default q8_0), checked against the trained model in llama.cpp.")  # fmt: skip
    t.add_argument("--gguf-adapter", action="store_true", help="With --export: also the LoRA as a GGUF adapter.")
    t.add_argument("--no-parity", action="store_true", help="With --gguf: skip the llama.cpp comparison.")
    t.add_argument("--push-to-hub", default=None, metavar="USER/NAME", help="With --export: upload it to the Hub.")
    t.add_argument("--private", action="store_true", help="With --push-to-hub: create the repo private.")
    k = sub.add_parser("kernel", help="Install a Jupyter kernel that starts with tcmalloc (less RAM, faster on CPU).")
    k.add_argument("--name", default="peft-magic-tcmalloc", help="Kernel spec name (default peft-magic-tcmalloc).")
    from .quickstart import build_parser as quickstart_parser

    quickstart_parser(sub.add_parser("quickstart", help="Fine-tune SmolLM2 with LoRA on demo data, offline; "
                                     "show base vs tuned answers; export the adapter."))  # fmt: skip
    return parser


def main(argv=None) -> int:
    from .errors import ConfigError

    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("train", "quickstart"):  # this process is the program, not a caller's
        _restart_on_tcmalloc()  # main([...]): it may start over on tcmalloc, before anything heavy is imported
    if args.command == "quickstart":
        from .quickstart import main as quickstart

        return quickstart(args)
    run = None
    try:
        if args.command == "kernel":
            from .allocator import install_kernel

            print(f"installed {install_kernel(args.name)}: pick 'Python 3 (peft_magic, tcmalloc)' in Jupyter")
            return 0
        if not os.path.isfile(args.config):  # the positional CONFIG, not the magic's --config
            raise ConfigError(f"'{args.config}' does not exist. Fix: check the path of the YAML file "
                              "(peft-magic train CONFIG.yaml).", key="CONFIG")  # fmt: skip
        if args.dry_run:
            from .dryrun import dry_run

            print(dry_run(args.config, overrides=args.overrides, name=args.name).text())
            return 0
        _check_export_options(args)  # before training: a typo or a full folder must not cost a training run
        from .api import train

        # with --resume the run folder is continued, so --overwrite can only mean the export folder (launch.sh
        # passes --overwrite for ./adapter on every launch, --resume included)
        run = train(args.config, overrides=args.overrides, name=args.name, resume=args.resume, display="auto",
                    overwrite=args.overwrite and not args.resume)
        if args.export and _is_main_process():
            path = run.export(args.export, merge=args.merge, overwrite=args.overwrite, gguf=args.gguf,
                              gguf_adapter=args.gguf_adapter, push_to_hub=args.push_to_hub, private=args.private,
                              parity=not args.no_parity, display="terminal")  # fmt: skip
            print(f"exported to {path}")
            if run.last_export.hub_url:
                print(f"pushed to {run.last_export.hub_url}")
        return 0 if run.state.stop_reason in ("completed", "stopped", "interrupted") else 1
    except ConfigError as e:
        if _is_main_process():  # under a launcher every rank hits the same mistake: say it once
            print(f"error: {cli_words(str(e))}", file=sys.stderr)
            if run is not None:  # the export failed after training: say where the work is
                print(f"the trained run is kept in {run.config.train.output_dir} (its final checkpoint). Export it "
                      f"without training again: peft-magic train {args.config} --resume --export DIR", file=sys.stderr)
        return 2


def _restart_on_tcmalloc() -> None:
    """Start this command over with tcmalloc preloaded when it is installed and this process runs glibc's malloc
    (see allocator.py: on CPU, ~0.6x the peak RAM and faster). The same process id, so a launcher (accelerate,
    torchrun) still follows it; once only (PEFT_MAGIC_MALLOC=system afterwards, or set by the user, keeps glibc's)."""
    from . import allocator

    if allocator.active() != "glibc" or not getattr(sys, "orig_argv", None):
        return
    env = allocator.preload_env()  # unchanged when tcmalloc is not installed or not wanted
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    env["PEFT_MAGIC_MALLOC"] = "system"  # if the preload did not take, do not try again
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


# Messages are written for the notebook and Python; on the command line the same fix has other words.
_CLI_WORDS = (
    (" (overwrite=True in train())", ""),
    (" (overwrite=True)", ""),
    ("(resume=True in train(), or `train.resume: auto` to do so without asking)",
     "(or `--set train.resume=auto` to do so without asking)"),
)  # fmt: skip


def cli_words(message: str) -> str:
    """`message` in the command line's words: ``--overwrite``, not ``overwrite=True``."""
    for notebook, cli in _CLI_WORDS:
        message = message.replace(notebook, cli)
    return message


def _check_export_options(args) -> None:
    from .errors import ConfigError

    wanted = [f for f, on in (("--gguf", args.gguf), ("--gguf-adapter", args.gguf_adapter),
                              ("--push-to-hub", args.push_to_hub)) if on]  # fmt: skip
    if wanted and not args.export:
        raise ConfigError(f"{wanted[0]} needs --export DIR (the folder the files go to).", key=wanted[0])
    if args.gguf or args.gguf_adapter:
        from .gguf.quant import parse_quant, require_gguf

        require_gguf()
        if args.gguf:
            parse_quant(args.gguf)
    if args.push_to_hub:
        from .export.hub import check_push

        check_push(args.push_to_hub)
    if args.export and _is_main_process():
        from .export.folder import check_target

        check_target(args.export, args.overwrite)


def _is_main_process() -> bool:
    from .distributed.ranks import is_main_process  # from the launcher's environment: works before and after training

    return is_main_process()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
