"""Write the demo notebooks from one place, so their shared cells (badge, install, environment check) never drift.

    python demo_notebooks/build.py          # rewrites demo_notebooks/*.ipynb (outputs empty)

Each notebook has a cell tagged ``parameters`` (papermill's convention): its defaults are hub ids for real users;
`tests/test_notebooks.py` (or ``papermill -p MODEL ...``) inserts an ``injected-parameters`` cell after it to run the
same notebook offline on models shipped in packages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO_URL = "github.com/peft-magic/peft_magic"
INSTALL = f"peft-magic @ git+https://{REPO_URL}"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, *tags: str):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def header(name: str, title: str, intro: str) -> list:
    badge = (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/{REPO_URL.replace('github.com', 'github')}/blob/main/demo_notebooks/{name})"
    )
    return [md(f"# {title}\n\n{badge}\n\n{intro}")]


def install(extra: str = "") -> list:
    """Colab and Kaggle start without peft_magic; a local checkout has it from `scripts/setup.sh`."""
    lines = [
        "# Colab / Kaggle: install peft_magic on first run (a local checkout has it from scripts/setup.sh).",
        "import importlib.util",
        "",
        'if importlib.util.find_spec("peft_magic") is None:',
        f'    %pip install -q "{INSTALL}"',
    ]
    if extra:
        lines += [f'if importlib.util.find_spec("{extra}") is None:', f"    %pip install -q {extra}"]
    return [code("\n".join(lines))]


def parameters(body: str) -> list:
    return [
        md(
            "## Parameters\n\nChange these to use your own model or run longer. (Tagged `parameters`: papermill and "
            "the project's CI override them.)"
        ),
        code(body, "parameters"),
    ]


ENVIRONMENT = """
# Where are we, and what will training run on?
import importlib.util
import os
import sys

from peft_magic.devices import device_info, resolve_mixed_precision

IN_COLAB = "google.colab" in sys.modules
IN_KAGGLE = os.path.isdir("/kaggle/working")
device = device_info()
has_bnb = importlib.util.find_spec("bitsandbytes") is not None
print(f"platform      {'Colab' if IN_COLAB else 'Kaggle' if IN_KAGGLE else 'local'}")
print(f"device        {device.label}: {device.name}, {device.total_memory / 2**30:.0f} GB")
print(f"bf16          {'yes' if device.bf16 else 'no'} (mixed_precision: auto picks "
      f"{resolve_mixed_precision('auto', device)})")
print(f"bitsandbytes  {'installed' if has_bnb else 'missing: %pip install bitsandbytes (needed for 4bit / 8bit)'}")
if device.kind == "cpu":
    print("advice        no GPU: fine for this small demo, slow for real models. Colab: Runtime > Change runtime "
          "type > T4 GPU. Kaggle: Settings > Accelerator > GPU.")
elif not device.bf16:
    print("advice        this GPU has no bf16 (e.g. T4): training uses fp16 mixed precision, which is fine.")

# Outputs that outlive the session: Kaggle keeps /kaggle/working; Colab forgets /content unless Drive is mounted.
if IN_KAGGLE:
    RUNS = "/kaggle/working/peft_runs"
elif IN_COLAB and USE_DRIVE:
    from google.colab import drive

    drive.mount("/content/drive")
    RUNS = "/content/drive/MyDrive/peft_runs"
else:
    RUNS = "peft_runs"
os.makedirs(RUNS, exist_ok=True)
print(f"outputs       {os.path.abspath(RUNS)}"
      + ("  (lost when the Colab session ends: set USE_DRIVE = True to keep them)" if IN_COLAB and not USE_DRIVE else ""))
"""


def environment() -> list:
    return [md("## Environment check"), code(ENVIRONMENT)]


def opening(params: str, extra: str = "") -> list:
    """The cells every notebook starts with after its title: install, parameters, environment check."""
    return install(extra) + parameters(params) + environment()


LOAD_WITH_PEFT = """
### Load the adapter without peft_magic

The export folder is a plain peft adapter (`adapter_config.json` + `adapter_model.safetensors`) with the tokenizer,
the resolved config (`peft_magic.yaml`) and a model card (`README.md`):

```python
from peft import PeftModel
from transformers import {auto}, AutoTokenizer

base = {auto}.from_pretrained("{model}")
model = PeftModel.from_pretrained(base, "{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```

or, with the run's settings and labels, `peft_magic.load("{folder}")`.
"""


# ---------------------------------------------------------------- 01 quickstart


def quickstart() -> list:
    cells = header(
        "01_quickstart.ipynb",
        "Quickstart: fine-tune a small instruct model with LoRA in one cell",
        f"We teach `{SMOLLM2}` a house style: every answer is one terse line, `Answer: <fact>.`. The base model "
        "answers in free-form sentences; after a few dozen LoRA steps the tuned one answers in the house style, "
        "also for questions it never saw. Runs on a CPU in a few minutes, in seconds on a GPU.",
    )
    cells += opening(f'''
MODEL = "{SMOLLM2}"  # a hub id, a local folder or a .gguf file
STEPS = 30  # optimizer steps of 8 examples: ~1.5 passes over the demo data (a few minutes on CPU)
USE_DRIVE = False  # Colab: keep outputs in Google Drive''', "gguf")  # gguf: the GGUF export at the end
    cells += [
        md(
            "## Load the extension and the data\n\n`%load_ext peft_magic` imports nothing heavy; the demo data is "
            "written by the project itself (`peft_magic.demo_data`): capital cities, unit conversions and sums in "
            "words, ~170 rows."
        ),
        code("%load_ext peft_magic"),
        code(
            "from peft_magic.demo_data import DEMO_PROMPTS, instruction_data\n\ntrain_df = instruction_data()\n"
            "print(len(train_df), 'rows')\ntrain_df.head()"
        ),
        md(
            "## The base model\n\n`%peft_model` sets the session's base model (cells may then omit `model:`) and "
            "says what it is, from its config alone."
        ),
        code("%peft_model $MODEL"),
        md(
            "## Fine-tune\n\nOne cell: the YAML body is the whole configuration (see `docs/config.md` for every "
            "key). `$train_df` is the DataFrame above; `$STEPS` and `$RUNS` come from the parameters. The live panel "
            "shows progress, the loss curve, throughput and memory; **Stop** (or the kernel's ■) ends the run "
            "after the current step and keeps everything. When it ends, a static summary stays in the notebook."
        ),
        code("""
%%peft_train run --set train.max_steps=$STEPS --set train.output_dir=$RUNS/quickstart
method: {name: lora, r: 8, lora_alpha: 16, target_modules: all-linear}
data:
  train: $train_df
  eval: 0.1            # hold out 10% to measure eval loss
  max_length: 64
train:
  learning_rate: 2.0e-3  # high for LoRA, on purpose: a visible change in a few dozen steps
  per_device_train_batch_size: 8
  logging_steps: 5
  eval_steps: 20"""),
        md(
            "## Did it learn?\n\nEval loss and perplexity on the held-out 10%, then base vs tuned answers for "
            "questions that are **not** in the training data."
        ),
        code("%peft_eval run"),
        code('''
%peft_generate run "What is the capital of Italy?"
%peft_generate run "Convert 7 kilograms to grams."
%peft_generate run "What is six plus nine?"'''),
        md("The same from Python: `run.generate(prompt)`, `run.history` (one row per logged step), `run.metrics`."),
        code("""
import pandas as pd

pd.DataFrame(run.history).tail()"""),
        md("## Export in one line"),
        code("%peft_export run $RUNS/quickstart-adapter --overwrite"),
        md(LOAD_WITH_PEFT.format(auto="AutoModelForCausalLM", model=SMOLLM2, folder="peft_runs/quickstart-adapter")),
        md(QUICKSTART_GGUF),
        code("%peft_export run $RUNS/quickstart-gguf --overwrite --gguf q8_0"),
        md(QUICKSTART_GGUF_RUN),
    ]
    return cells


QUICKSTART_GGUF = """
## Run it outside the notebook: llama.cpp and Ollama

`--gguf q8_0` writes the tuned model (adapter merged in) as one GGUF file, with its tokenizer and chat template,
and an Ollama `Modelfile` beside it: no compiler, no llama.cpp checkout. Then it checks that the file answers like
the model in this notebook: the run's held-out questions through both, greedy, side by side, with the
log-likelihood of each answer under both models. A difference comes with its likely cause (a quantization too
coarse, a template lost on the way). The check runs llama.cpp through `llama-cpp-python`
(`pip install 'peft-magic[gguf-check]'`, which compiles for a few minutes); without it the export says it skipped
the check. `--gguf-adapter` writes the LoRA alone as a GGUF adapter of a few MB for the base GGUF file.
"""

QUICKSTART_GGUF_RUN = """
Outside the notebook (the folder's `README.md` says the same, with the table above):

```bash
cd peft_runs/quickstart-gguf
llama-cli -m run-q8_0.gguf -cnv --temp 0                      # llama.cpp
ollama create quickstart -f Modelfile && ollama run quickstart   # Ollama
```

```python
from llama_cpp import Llama                                      # llama-cpp-python
llm = Llama(model_path="peft_runs/quickstart-gguf/run-q8_0.gguf")
llm.create_chat_completion([{"role": "user", "content": "What is the capital of Italy?"}], temperature=0)
```
"""


# ---------------------------------------------------------------- 02 classification


def classification() -> list:
    cells = header(
        "02_text_classification.ipynb",
        "Text classification: a task head + LoRA, with accuracy, F1 and a confusion matrix",
        f"`{MINILM}` (a 22M-parameter sentence encoder) learns to route customer-support messages to "
        "`billing`, `delivery` or `account`. The classification head is built from the label set and trained "
        "with the adapter.",
    )
    cells += opening(f'''
MODEL = "{MINILM}"
STEPS = 80
USE_DRIVE = False  # Colab: keep outputs in Google Drive''')
    cells += [
        md(
            "## Data\n\n300 short messages written by the project (`peft_magic.demo_data`); 20% are held out as a "
            "test set that training never sees."
        ),
        code("%load_ext peft_magic"),
        code("""
from peft_magic.demo_data import classification_data

df = classification_data(300)
test_df = df.sample(frac=0.2, random_state=0)
train_df = df.drop(test_df.index)
print(len(train_df), "train /", len(test_df), "test")
train_df.label.value_counts()"""),
        code("%peft_model $MODEL"),
        md(
            "## Train\n\n`task: seq-cls` builds the head from the labels (string labels are mapped to ids; the "
            "mapping is saved in the model config). Evaluation runs every 20 steps on `$test_df`."
        ),
        code("""
%%peft_train clf --set train.max_steps=$STEPS --set train.output_dir=$RUNS/classifier
task: seq-cls
method: {name: lora, r: 8, lora_alpha: 16, target_modules: [query, value]}
data:
  train: $train_df
  eval: $test_df
  text_column: text
  label_column: label
  max_length: 32
train:
  learning_rate: 2.0e-3
  per_device_train_batch_size: 16
  logging_steps: 10
  eval_steps: 20"""),
        md("## Evaluate\n\nAccuracy, precision, recall and F1 (macro and per class), and the confusion matrix."),
        code("%peft_eval clf"),
        code("""
clf.predict(["I was charged twice for my subscription", "my parcel is still not here",
             "I forgot my password and cannot log in"])"""),
        md("## Export and reload"),
        code("%peft_export clf $RUNS/support-classifier --overwrite"),
        code("""
import peft_magic

loaded = peft_magic.load(f"{RUNS}/support-classifier")
loaded.predict(["where is my order?", "refund the double charge please"])"""),
        md(
            LOAD_WITH_PEFT.format(
                auto="AutoModelForSequenceClassification", model=MINILM, folder="peft_runs/support-classifier"
            )
        ),
    ]
    return cells


# ---------------------------------------------------------------- 03 QLoRA


def qlora() -> list:
    cells = header(
        "03_qlora_4bit.ipynb",
        "QLoRA: a 4-bit base model, the memory pre-flight, export and merge",
        "QLoRA keeps the frozen base in 4-bit NF4 (bitsandbytes, double quantization) and trains a LoRA adapter "
        "on top, so a model several times larger than the GPU's memory in 16-bit fits. `--dry-run` shows the "
        "plan and the memory estimate before anything loads.",
    )
    cells += opening(f'''
MODEL = "{SMOLLM2}"
QUANTIZATION = "4bit"  # 4bit (NF4, QLoRA) | 8bit (LLM.int8()) | none
STEPS = 40
USE_DRIVE = False  # Colab: keep outputs in Google Drive''', extra="bitsandbytes")
    cells += [
        code("""
%load_ext peft_magic
from peft_magic.demo_data import DEMO_PROMPTS, instruction_data

train_df = instruction_data()"""),
        md("`%peft_model ... --quantization 4bit` makes every later cell load the base in 4-bit."),
        code("%peft_model $MODEL --quantization $QUANTIZATION"),
        md(
            "## Pre-flight: what will this take?\n\n`--dry-run` resolves the config, reads the data, builds the "
            "model on the meta device (no weights loaded) and estimates peak memory against this device."
        ),
        code("""
%%peft_train qrun --dry-run --set train.max_steps=$STEPS
method: {name: lora, r: 16, lora_alpha: 32, target_modules: all-linear}
data: {train: $train_df, eval: 0.1, max_length: 64}
train: {learning_rate: 1.0e-3, per_device_train_batch_size: 8, logging_steps: 5, eval_steps: 20}"""),
        md("## Train\n\nThe same cell without `--dry-run`."),
        code("""
%%peft_train qrun --set train.max_steps=$STEPS --set train.output_dir=$RUNS/qlora
method: {name: lora, r: 16, lora_alpha: 32, target_modules: all-linear}
data: {train: $train_df, eval: 0.1, max_length: 64}
train: {learning_rate: 1.0e-3, per_device_train_batch_size: 8, logging_steps: 5, eval_steps: 20}"""),
        code("%peft_eval qrun"),
        code('%peft_generate qrun "What is the capital of Italy?"'),
        md(
            "## Export: the adapter, or a merged model\n\nThe adapter applies to the same base loaded in 4-bit. "
            "`--merge` writes a full model with the adapter folded in, **dequantized** (bitsandbytes weights "
            "cannot hold a merged delta), which loads with plain transformers."
        ),
        code("%peft_export qrun $RUNS/qlora-adapter --overwrite"),
        code("%peft_export qrun $RUNS/qlora-merged --merge --overwrite"),
        code("""
from transformers import AutoModelForCausalLM

merged = AutoModelForCausalLM.from_pretrained(f"{RUNS}/qlora-merged")
print(type(merged).__name__, f"{sum(p.numel() for p in merged.parameters()):,} parameters,",
      "dtype", next(merged.parameters()).dtype)"""),
        md(
            LOAD_WITH_PEFT.format(auto="AutoModelForCausalLM", model=SMOLLM2, folder="peft_runs/qlora-adapter")
            + '\nLoad the base with the same `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
            "bnb_4bit_use_double_quant=True)` to get the trained model back."
        ),
    ]
    return cells


# ---------------------------------------------------------------- 04 compare


def classification_setup() -> list:
    """The shared first cells of notebooks 04 and 05: the extension, the support-ticket data split, the model."""
    return [
        code("""
%load_ext peft_magic
from peft_magic.demo_data import classification_data

df = classification_data(300)
test_df = df.sample(frac=0.2, random_state=0)
train_df = df.drop(test_df.index)"""),
        code("%peft_model $MODEL"),
    ]


def compare_methods() -> list:
    cells = header(
        "04_compare_methods.ipynb",
        "Compare PEFT families on one task: additive, selective, reparameterized",
        "`%%peft_compare` trains one config once per method, one after another on the same data, and shows one "
        "table (trainable %, peak memory, time, final metrics) and the loss curves overlaid. Here: LoRA "
        "(reparameterized), IA3 (additive) and BitFit (selective) on the support-ticket classifier of notebook 02.",
    )
    cells += opening(f'''
MODEL = "{MINILM}"
STEPS = 60
USE_DRIVE = False  # Colab: keep outputs in Google Drive''')
    cells += [
        *classification_setup(),
        md(
            "`compare:` lists the methods (a name, or a mapping with the method's own parameters); the rest of the "
            "cell is one ordinary training config shared by every variant. `--dry-run` lists the variants and "
            "checks every config before anything trains."
        ),
        code("""
%%peft_compare methods --dry-run
task: seq-cls
data: {train: $train_df, eval: $test_df, max_length: 32}
compare:
  - {name: lora, r: 8, target_modules: [query, value]}
  - ia3
  - bitfit"""),
        code("""
%%peft_compare methods --set train.max_steps=$STEPS --set train.output_dir=$RUNS/compare
task: seq-cls
data: {train: $train_df, eval: $test_df, max_length: 32}
train: {learning_rate: 5.0e-3, per_device_train_batch_size: 16, logging_steps: 10, eval_steps: 0}
compare:
  - {name: lora, r: 8, target_modules: [query, value]}   # R: low-rank updates of the attention weights
  - ia3                                                  # A: learned scaling vectors
  - bitfit                                               # S: only the biases (and the head)"""),
        md(
            "On this easy task all three reach full test accuracy within 60 steps (measured on CPU: LoRA 0.33% "
            "of the parameters trained, IA3 0.08%, BitFit 0.12%); they differ in how many parameters train, how "
            "fast the loss falls and how long a step takes. One learning rate for all is a compromise: add "
            "`sweep: {train.learning_rate: [1.0e-3, 5.0e-3, 2.0e-2]}` to give each method its best shot.\n\n"
            "The result stays in `methods`: `.table` is a pandas DataFrame, `.runs` the runs by variant."
        ),
        code("methods.table"),
    ]
    return cells


# ---------------------------------------------------------------- 05 form


def widget_form() -> list:
    cells = header(
        "05_widget_form.ipynb",
        "The widget form: configure, Start, Stop, Copy as cell",
        "`%peft_ui` shows a form generated from the same config dataclasses as the `%%peft_train` YAML: "
        "Model → Method → Data → Training → Export, each field with its help on hover. **Start** trains with the "
        "live panel below the form, **Stop** ends the run after the current step (keeping everything), "
        "**Export** writes the adapter, **Copy as cell** gives the `%%peft_train` cell of the current form.",
    )
    cells += opening(f'''
MODEL = "{MINILM}"
STEPS = 60
USE_DRIVE = False  # Colab: keep outputs in Google Drive''')
    cells += [
        *classification_setup(),
        md(
            "## The form\n\nThe base model comes from `%peft_model`; the data dropdown lists this notebook's "
            "DataFrames (`$train_df`, `$test_df`). Set `task` to `seq-cls`, press **Start** and watch the panel "
            "under the form; **Stop** at any time."
        ),
        code("%peft_ui clicked_run"),
        md(
            "## The same form, driven from Python\n\nEvery button is a method (`start`, `stop`, `export`, "
            "`copy_as_cell`), so the form can be filled and run from code too, which is how this notebook runs "
            "unattended in CI."
        ),
        code("""
from peft_magic.ui.form import Form

form = Form({"model": MODEL, "task": "seq-cls",
             "method": {"name": "lora", "r": 8, "target_modules": ["query", "value"]},
             "data": {"train": "$train_df", "eval": "$test_df", "max_length": 32},
             "train": {"max_steps": STEPS, "learning_rate": 2.0e-3, "per_device_train_batch_size": 16,
                       "eval_steps": 20, "output_dir": f"{RUNS}/form_run"}},
            name="form_run")
form"""),
        md(
            "**Copy as cell** gives the `%%peft_train` cell that trains exactly this configuration (data stays "
            "`$name`): paste it into a notebook to keep the experiment reproducible."
        ),
        code("print(form.cell_text())"),
        md(
            "**Start** trains in the background with the live panel under the form above and stores the run as "
            "`form_run`; the kernel stays free, so **Stop** (or `form_run.stop()`) works while it trains."
        ),
        code("""
run = form.start()
run.wait()  # block this cell until the run ends (Stop still works from the form)
print(form_run.status, form_run.state.stop_reason, f"{form_run.state.step} steps")"""),
        code("%peft_eval form_run"),
        md("**Export** writes the adapter to the Export tab's folder (or the one given here)."),
        code('form.export(f"{RUNS}/form-adapter")'),
    ]
    return cells


# ---------------------------------------------------------------- 06 full vs PEFT (issue 9)


def full_vs_peft() -> list:
    cells = header(
        "06_full_vs_peft.ipynb",
        "Full fine-tuning vs PEFT: task quality, forgetting, memory, time and data efficiency",
        "People choose PEFT over full fine-tuning for four claims: far fewer trainable parameters and less memory, comparable task quality, less forgetting of what the model knew, and better results with little data. This notebook checks them on one small model and one task, instead of taking them on faith: `method: full` (every parameter trains), LoRA (reparameterized) and `layers` (selective: the last two blocks), with `forgetting: default` measuring each model's loss on general English text before and after training.",
    )
    cells += opening(
        '\nMODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"\nSTEPS = 40  # optimizer steps per variant (x 8 examples)\nUSE_DRIVE = False  # Colab: keep outputs in Google Drive'
    )
    cells += [
        code(
            '%load_ext peft_magic\nfrom peft_magic.demo_data import instruction_data\n\ndf = instruction_data()\ntest_df = df.sample(frac=0.15, random_state=0)\ntrain_df = df.drop(test_df.index)\nprint(len(train_df), "train rows,", len(test_df), "held out")'
        ),
        code("%peft_model $MODEL"),
        md(
            "## Three methods, one cell\n\n`forgetting: default` is peft_magic's built-in general text (71 short paragraphs of everyday English, written for the project, offline). Before training, the base model's loss on it is measured; after training, the tuned model's. The comparison table gains `forgetting_loss_delta` (tuned minus base: above 0 means the model got worse at plain English) and `forgetting_ppl_ratio`, next to trainable %, peak memory, training time and the eval loss on the task.\n\nOne learning rate for all three is a compromise (LoRA usually likes ~10x more than full fine-tuning); sweep `train.learning_rate` to give each method its best shot."
        ),
        code(
            "%%peft_compare full_vs_peft --set train.max_steps=$STEPS --set train.output_dir=$RUNS/full_vs_peft\ndata: {train: $train_df, eval: $test_df, max_length: 64, forgetting: default}\ntrain: {learning_rate: 1.0e-4, per_device_train_batch_size: 8, logging_steps: 10, eval_steps: 0, save_total_limit: 1}\ncompare:\n  - full                        # F: every parameter (refused, with an estimate, if it cannot fit)\n  - {name: lora, r: 8}          # R: low-rank updates of every linear layer\n  - {name: layers, last_n: 2}   # S: only the last two transformer blocks"
        ),
        code("full_vs_peft.table"),
        md(
            '## Task quality against forgetting\n\nOne point per method. For a loss, **lower** is better (the axis title says which way is better); **left** is less forgetting. The dashed line is "no change on general text".'
        ),
        code("from IPython.display import SVG\n\nSVG(full_vs_peft.tradeoff_svg())"),
        md(
            "## Which method does better with little data?\n\n`train_samples` is a sweep key like any other (`all` = every row); each variant trains the same number of steps on a smaller or larger set."
        ),
        code(
            "%%peft_compare sizes --set train.max_steps=$STEPS --set train.output_dir=$RUNS/sizes\ndata: {train: $train_df, eval: $test_df, max_length: 64, forgetting: default}\ntrain: {learning_rate: 1.0e-4, per_device_train_batch_size: 8, logging_steps: 10, eval_steps: 0, save_total_limit: 1}\ncompare: [full, {name: lora, r: 8}]\nsweep: {train_samples: [16, 48, all]}"
        ),
        code("SVG(sizes.size_svg())"),
        md(
            "## Reading it honestly\n\n* **Trainable % and memory** are what they are: full fine-tuning trains 100% and keeps a gradient and two AdamW moments for every weight; LoRA and `layers` train a few percent.\n* **Forgetting** only means something next to the task metric: a method that barely moved forgets little because it learned little. Compare points at a similar eval loss.\n* A few dozen steps on a 135M model are a smoke test, not a study: the differences in forgetting are small and move with the learning rate and the number of steps. For your own decision, use your model, your data, a learning-rate sweep per method, and general text close to what the model must keep knowing (`forgetting: $my_texts`). See `docs/forgetting.md` for a worked reading."
        ),
    ]
    return cells


# ---------------------------------------------------------------- 07 preferences and rewards

REWARDS = """
def starts_with_answer(prompts, completions, **columns):
    return [1.0 if c.strip().startswith("Answer:") else 0.0 for c in completions]


def is_correct(prompts, completions, answer, **columns):
    return [1.0 if a.lower() in c.lower() else 0.0 for c, a in zip(completions, answer)]


print(starts_with_answer(["?", "?"], ["Answer: Paris.", "It is Paris."]),
      is_correct(["?", "?"], ["Answer: Paris.", "Lyon"], answer=["Paris", "Paris"]))

# each question asks for the format: some samples follow it, most not yet (all zeros would teach nothing)
questions = reward_prompts(hint=True)
held_questions = reward_prompts(held_out=True, hint=True)
questions.head(3)"""


def preference_and_rewards() -> list:
    cells = header(
        "07_preference_and_rewards.ipynb",
        "Preferences and rewards: DPO, then GRPO with reward functions written in the notebook",
        "The quickstart's house style (`Answer: <fact>.`) taught two other ways. **DPO** learns from pairs: for "
        "each question, the house-style answer is *chosen* over a free-form, rambling or wrong one. **GRPO** "
        "learns from reward functions you write in a cell: the model samples a few answers per question, each is "
        "scored, and the better-than-average ones are made more likely. Both on "
        f"`{SMOLLM2}`, in peft_magic's own training loop: the live panel, Stop, resume and export work as for "
        "supervised training. See `docs/preference.md`.",
    )
    cells += opening(f'''
MODEL = "{SMOLLM2}"  # a hub id, a local folder or a .gguf file
DPO_STEPS = 20  # optimizer steps of 4 pairs
GRPO_STEPS = 16  # optimizer steps of 2 questions x 4 sampled answers
USE_DRIVE = False  # Colab: keep outputs in Google Drive''')
    cells += [
        md(
            "## Preference pairs\n\nWritten by the project (`peft_magic.demo_data`), in TRL's conversational "
            "shape: `prompt` (the user's message), `chosen` and `rejected` (an assistant message each); plain "
            "strings work too. The questions of `held_out` (the quickstart's demo questions and a few more) are "
            "never trained on."
        ),
        code("%load_ext peft_magic"),
        code(
            "from peft_magic.demo_data import DEMO_PROMPTS, preference_data, reward_prompts\n\n"
            "pairs = preference_data()\nheld_out = preference_data(held_out=True)\n"
            "print(len(pairs), 'pairs,', len(held_out), 'held out')\npairs.head(3)"
        ),
        code("%peft_model $MODEL"),
        md(
            "## DPO\n\nThe reference policy DPO measures against is the base model itself: with an adapter, "
            "peft_magic turns the adapter off for the reference pass, so no second copy of the model is loaded. "
            "The panel shows the loss, the implicit rewards of the chosen and rejected answers, their margin and "
            "the preference accuracy (the share of pairs whose chosen answer gained more than the rejected one), "
            "for training and for the held-out pairs."
        ),
        code("""
%%peft_train prefs --set train.max_steps=$DPO_STEPS --set train.output_dir=$RUNS/dpo
task: dpo
method: {name: lora, r: 8, lora_alpha: 16, target_modules: all-linear}
data: {train: $pairs, eval: $held_out, max_length: 80}
dpo: {beta: 0.1, loss_type: sigmoid}
train: {learning_rate: 5.0e-4, per_device_train_batch_size: 4, logging_steps: 2, eval_steps: 10}"""),
        md("`%peft_eval` on a preference run reports the preference accuracy and the mean margin."),
        code("%peft_eval prefs"),
        code("""
for prompt in DEMO_PROMPTS:
    print(f"{prompt:32} {prefs.generate(prompt, max_new_tokens=16)}")"""),
        md(
            "## GRPO with reward functions\n\nA reward function takes the prompts, the completions and, as "
            "keyword arguments, the row's other columns (here `answer`), and returns one number per completion. "
            "Try it on a few strings first: during training, a function that raises or returns the wrong thing "
            "stops the run with one line naming it, and the last checkpoint is kept."
        ),
        code(REWARDS),
        md(
            "Each step samples `num_generations` answers per question with the current policy (seeded: a "
            "resumed run samples the same ones), scores them, and makes the ones above their group's mean more "
            "likely. The panel shows the mean reward per function and in total, the spread within groups, the "
            "completion length, the KL to the base, and a table of recent samples with their rewards."
        ),
        code("""
%%peft_train rl --set train.max_steps=$GRPO_STEPS --set train.output_dir=$RUNS/grpo
task: grpo
method: {name: lora, r: 8, lora_alpha: 16, target_modules: all-linear}
data: {train: $questions, max_length: 64}
grpo: {rewards: [$starts_with_answer, $is_correct], num_generations: 4, max_new_tokens: 12, temperature: 1.0,
       beta: 0.04, epsilon: 0.2}
train: {learning_rate: 1.0e-3, per_device_train_batch_size: 2, logging_steps: 2}"""),
        code("""
import pandas as pd

pd.DataFrame(rl.history)[["step", "reward", "reward_starts_with_answer", "reward_is_correct", "kl"]].dropna().tail()"""),
        md("`%peft_eval` on a GRPO run answers the eval prompts greedily and reports the mean reward per function."),
        code("%peft_eval rl --data $held_questions"),
        md("## Export\n\nAs for any run: a peft adapter (`--merge` for a full model, `--gguf q8_0` for llama.cpp)."),
        code("%peft_export rl $RUNS/grpo-adapter --overwrite"),
    ]
    return cells


# ---------------------------------------------------------------- 08 data formats (issue 16)


def data_formats() -> list:
    cells = header(
        "08_data_formats.ipynb",
        "Data formats: ShareGPT, messages, alpaca, and seeing exactly what is trained",
        "Public instruction datasets come in a handful of shapes: ShareGPT (`conversations` of `from`/`value`), "
        "OpenAI/TRL `messages` (`role`/`content`), alpaca (`instruction`/`input`/`output`), TRL "
        "prompt/completion. peft_magic detects the shape from the columns, renders conversations with the "
        "tokenizer's chat template, and trains **every assistant turn** and nothing else. This notebook shows what "
        "is trained before training, then trains with `eval.samples`: the model answers a few fixed held-out "
        "questions at each evaluation, in a table that grows with the run.",
    )
    cells += opening(f'''
MODEL = "{SMOLLM2}"  # a hub id, a local folder or a .gguf file
STEPS = 30  # optimizer steps of 8 conversations
USE_DRIVE = False  # Colab: keep outputs in Google Drive''')
    cells += [
        md(
            "## A ShareGPT dataset\n\nThe demo questions (`peft_magic.demo_data`), two per conversation, with a "
            "system turn: the shape of ShareGPT exports (`from`: `system`, `human`, `gpt`)."
        ),
        code("""
%load_ext peft_magic
from peft_magic.demo_data import instruction_data

qa = instruction_data()
SYSTEM = "You answer in one terse line."
chats = [{"conversations": [{"from": "system", "value": SYSTEM},
                            {"from": "human", "value": a.prompt}, {"from": "gpt", "value": a.response},
                            {"from": "human", "value": b.prompt}, {"from": "gpt", "value": b.response}]}
         for a, b in zip(qa[0::2].itertuples(), qa[1::2].itertuples())]
print(len(chats), "conversations")
chats[0]"""),
        code("%peft_model $MODEL"),
        md(
            "## What will be trained?\n\n`--dry-run` loads nothing heavy. Besides the plan and the memory estimate "
            "it says which format was detected (and how to pick another when two fit), which chat template renders "
            "the conversations, the tokens per example, the share of tokens trained, how many rows `max_length` "
            "cuts, and the first example with the trained text in `[[brackets]]`: both answers, never the system "
            "turn or the questions."
        ),
        code("""
%%peft_train chat --dry-run --set train.max_steps=$STEPS
data: {train: $chats, eval: 0.1, max_length: 128}"""),
        md(
            "## Train, with sample answers at each evaluation\n\n`eval: {samples: 3}` generates greedy answers "
            "(adapter on) to the first three held-out conversations, cut where their last answer begins, at each "
            "evaluation. The panel shows them under the metrics as the run goes; the summary, `chat.history` and "
            "the model card keep them. Training is the same with or without them."
        ),
        code("""
%%peft_train chat --set train.max_steps=$STEPS --set train.output_dir=$RUNS/data_formats
method: {name: lora, r: 8, lora_alpha: 16, target_modules: all-linear}
data: {train: $chats, eval: 0.1, max_length: 128}
eval: {samples: 3, max_new_tokens: 24}
train: {learning_rate: 2.0e-3, per_device_train_batch_size: 8, logging_steps: 5, eval_steps: 10}"""),
        md(
            "## Any example, from Python\n\n`run.data.preview(i)` (or a list or a range) is the same view as "
            "`%peft_data NAME -i I`: highlighted text is in the loss, grey is context only, with each example's "
            "token count and trained share."
        ),
        code("chat.data.preview(range(2))"),
        code("%peft_data chat -i 2"),
        md("The sample answers, as kept in the history (one list per evaluation):"),
        code("""
import pandas as pd

pd.DataFrame([{"step": r["step"], **s} for r in chat.history for s in r.get("samples", [])])"""),
        md(
            "## Other shapes, same result\n\nThe same conversations as OpenAI `messages` and the same questions "
            "as alpaca rows are detected without configuration (`data.format` picks one when two fit)."
        ),
        code("""
import peft_magic

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
messages = [{"messages": [{"role": ROLES[t["from"]], "content": t["value"]} for t in c["conversations"]]}
            for c in chats]
alpaca = [{"instruction": r.prompt, "input": "", "output": r.response} for r in qa.itertuples()]
for rows in (messages, alpaca):
    plan = peft_magic.dry_run({"model": MODEL, "data": {"train": rows, "max_length": 128}})
    print(plan.rows["format"])"""),
        md(
            "## Bad rows are one line naming the row and the fix\n\nA conversation that ends with a question has "
            "no answer to learn:"
        ),
        code("""
from peft_magic.errors import ConfigError

bad = chats[:5] + [{"conversations": chats[0]["conversations"][:2]}]
try:
    peft_magic.dry_run({"model": MODEL, "data": {"train": bad}})
except ConfigError as e:
    print(e)"""),
    ]
    return cells


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_text_classification.ipynb": classification,
    "03_qlora_4bit.ipynb": qlora,
    "04_compare_methods.ipynb": compare_methods,
    "05_widget_form.ipynb": widget_form,
    "06_full_vs_peft.ipynb": full_vs_peft,  # issue 9 (full fine-tuning, forgetting, data efficiency)
    "07_preference_and_rewards.ipynb": preference_and_rewards,  # issue 14 (DPO, GRPO)
    "08_data_formats.ipynb": data_formats,  # issue 16 (data shapes, what is trained, eval.samples)
}


def build(name: str):
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"  # Colab: ask for a GPU runtime when one is free
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding an unchanged notebook changes nothing
        cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"
    nbformat.validate(nb)
    return nb


def main(argv=None) -> int:
    names = (argv if argv else None) or list(NOTEBOOKS)
    for name in names:
        nbformat.write(build(name), HERE / name)
        print(f"wrote demo_notebooks/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
