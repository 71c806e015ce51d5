"""`Run`: what a training run leaves in the notebook (model, tokenizer, config, history, metrics) and what can be
done with it next (evaluate, generate/predict, export, stop, wait)."""

from __future__ import annotations

import threading

from .config.objectives import OBJECTIVE_TASKS
from .errors import ConfigError
from .events import TrainState


class Run:
    """One training run.

    Attributes:
        name: The notebook variable it is stored in.
        config: The resolved `Config`.
        model: The trained model (a PeftModel for peft methods).
        tokenizer: Its tokenizer.
        history: One dict per logged step (step, epoch, loss, learning_rate) and per evaluation (eval_*).
        metrics: The last evaluation's metrics (empty when there is no eval data).
        state: The live `TrainState` (step, status, stop_reason...).
        output_dir: Where checkpoints are written.
        last_export: What the last `export` wrote: files, GGUF parity reports, Hub URL.
    """

    last_export = None

    def __init__(self, name, config):
        self.name = name
        self.config = config
        self.model = None
        self.tokenizer = None
        self.method = None
        self.data = None
        self.labels = None
        self.history: list[dict] = []
        self.metrics: dict = {}
        self.state = TrainState()
        self.output_dir = config.train.output_dir
        self.warnings: list[str] = self.state.details  # library warnings and logs of the run (see library_output)
        self.preflight = None  # preflight.FitReport measured before loading the model
        self.cell: str | None = None  # the %%peft_train cell that made it (for the model card)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ control
    @property
    def status(self) -> str:
        return self.state.status

    def stop(self) -> None:
        """Stop after the current step; the weights so far, a checkpoint and the history are kept."""
        self._stop.set()

    def resume(self, *, background=False, display="auto", callbacks=(), checkpoint=None) -> "Run":
        """Continue training from the latest checkpoint (after `stop()`, an interrupt or a failure).

        Args:
            background: Train in a thread and return at once.
            display: As in `peft_magic.train`.
            callbacks: Extra event subscribers.
            checkpoint: A checkpoint folder to continue from instead of the latest one.
        """
        from .session import resume_in_process

        return resume_in_process(self, background=background, display=display, callbacks=callbacks, checkpoint=checkpoint)

    def wait(self, timeout=None) -> "Run":
        """Block until a background run ends; re-raises its error, if any."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None and not isinstance(self.error, ConfigError):
            raise self.error
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ use
    @property
    def trainable_params(self) -> tuple[int, int]:
        from .models import count_trainable

        return count_trainable(self.model, self.method)

    def evaluate(self, data=None, namespace=None) -> dict:
        """Evaluate on the run's eval data, or on `data` (any data source: $name, DataFrame, file...)."""
        from .session import evaluate_run

        return evaluate_run(self, data, namespace=namespace)

    def generate(self, prompt, max_new_tokens: int = 64, **kw) -> str:
        """Complete `prompt` (chat template applied when the tokenizer has one). Greedy unless kw say otherwise."""
        from .inference import generate

        self._require("causal-lm", "seq2seq", *OBJECTIVE_TASKS, what="generate")
        # the chat template only where training used it (instruction / chat data, conversational pairs or
        # prompts), else the raw prompt
        chat = self.data is None or self.data.kind in ("instruction", "chat")
        kw.setdefault("chat", chat or bool((getattr(self.data, "objective", None) or {}).get("chat")))
        if self.config.task == "seq2seq":
            kw["chat"] = False
        return generate(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens, **kw)

    def predict(self, texts):
        """Class names for `texts` (a string or a list of strings)."""
        from .inference import predict

        self._require("seq-cls", what="predict")
        return predict(self.model, self.tokenizer, texts, self.labels, self.config.data.max_length)

    def export(self, out_dir, merge: bool = False, overwrite: bool = False, *, gguf=None, gguf_adapter: bool = False,
               push_to_hub: str | None = None, private: bool = False, prompts=None, parity: bool = True,
               display: str = "auto", namespace=None) -> str:  # fmt: skip
        """Write the adapter (peft format) or, with merge, a full merged model; returns the folder.

        `gguf="q8_0"` (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q4_k_m, q5_k_m, q6_k) adds the merged model
        as one GGUF file with an Ollama Modelfile; `gguf_adapter=True` adds the LoRA as a GGUF adapter. Both are
        then compared with this model in llama.cpp on `prompts` (default: the run's eval prompts) when
        llama-cpp-python is installed. `push_to_hub="user/name"` uploads the folder. `self.last_export` keeps the
        files, the parity reports and the Hub URL (see `peft_magic.export.gguf_export`).
        """
        from .export.gguf_export import export_with_gguf

        if self.running:
            raise ConfigError("the run is still training. Fix: `run.stop()` or `run.wait()` first.", key="export")
        return export_with_gguf(self, out_dir, merge=merge, overwrite=overwrite, gguf=gguf, gguf_adapter=gguf_adapter,
                                push_to_hub=push_to_hub, private=private, parity=parity, prompts=prompts,
                                display=display, namespace=namespace).folder  # fmt: skip

    def release(self) -> None:
        """Drop the model and free its memory (a re-run of the cell calls this on the previous run)."""
        import gc

        self.stop()
        if self._thread is not None:
            self._thread.join()
        self.model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def _require(self, *tasks, what):
        if self.config.task not in tasks:
            raise ConfigError(f"{what}() is for {' / '.join(tasks)} runs; this run's task is {self.config.task}.",
                              key="task")  # fmt: skip
        if self.model is None:
            raise ConfigError("this run has no model (it was released or failed to load).", key=self.name)

    # ------------------------------------------------------------ display
    def summary(self) -> str:
        s = self.state
        bits = [f"Run '{self.name}': {s.title}", f"status {s.status}"]
        if s.max_steps:
            bits.append(f"step {s.step}/{s.max_steps}")
        last = next((r for r in reversed(self.history) if "loss" in r), None)
        if last:
            bits.append(f"loss {last['loss']:.4f}")
        if self.metrics:
            bits.append(", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if isinstance(v, float)))
        return " · ".join(bits)

    def __repr__(self) -> str:
        return f"<{self.summary()}>"
