"""The GGUF export wired into `run.export`, `%peft_export`, the CLI and the form, and the push to the Hub: the files
land in the export folder at once (atomic), the model card lists each with how to run it, the parity reports are
kept in `run.last_export`, and every bad request is refused in one line before anything is written.

The Hub cannot be reached from here: the upload is checked with a fake `HfApi` (which files would go, and that no
file holds the token) and with the real `HfApi` under HF_HUB_OFFLINE (the failure is one line, the export stays)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import instruction_rows
from test_gguf import bpe_llama, make_bpe_tokenizer, run  # noqa: F401 - the tiny trained Llama fixtures

import peft_magic
from peft_magic.errors import ConfigError

pytest.importorskip("gguf")
PROMPTS = ["say hello", "say yes"]
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
FAKE_TOKEN = "hf_peftmagicFAKEtoken0123456789abcdef"


def _all_text(folder):
    out = b""
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out += fh.read()
    return out


def test_export_writes_the_gguf_files_beside_the_adapter_with_a_card_listing_each(run, tmp_path):  # noqa: F811
    path = run.export(str(tmp_path / "exp"), gguf="f32", gguf_adapter=True, prompts=PROMPTS, display="none")
    names = set(os.listdir(path))
    assert {"adapter_model.safetensors", "run-f32.gguf", "run-adapter.gguf", "base-f32.gguf", "Modelfile",
            "Modelfile.adapter", "README.md"} <= names  # fmt: skip
    assert os.listdir(tmp_path) == ["exp"]  # no temporary folder or .partial file left beside it
    assert set(run.last_export.files) == names and run.last_export.folder == path
    with open(os.path.join(path, "README.md"), encoding="utf-8") as fh:
        card = fh.read()
    assert all(f"| `{n}` |" in card for n in names)  # every file, with what it is
    assert "PeftModel.from_pretrained" in card and "llama-cli -m run-f32.gguf" in card  # peft, llama.cpp
    assert "llama-cli -m base-f32.gguf --lora run-adapter.gguf" in card and "ollama create run -f Modelfile" in card
    with open(os.path.join(path, "Modelfile.adapter"), encoding="utf-8") as fh:
        assert "FROM ./base-f32.gguf\nADAPTER ./run-adapter.gguf\n" in fh.read()
    reports = run.last_export.parity
    if not HAS_LLAMA_CPP:
        assert len(reports) == 1 and "gguf-check" in reports[0].skipped
        return
    assert [os.path.basename(r.file) for r in reports] == ["run-f32.gguf", "base-f32.gguf + run-adapter.gguf"]
    assert reports.ok, reports.text()
    assert [r.notebook for r in reports[0].rows] == [run.generate(p, max_new_tokens=24) for p in PROMPTS]
    assert reports[0].max_ll_gap < 1e-3 and f"| {PROMPTS[0]} | {reports[0].rows[0].notebook} |" in card


def test_default_parity_prompts_are_the_runs_held_out_prompts(bpe_llama, tmp_path, capfd):  # noqa: F811
    import datasets

    from peft_magic.export.gguf_export import default_prompts

    rows = [{"prompt": f"say {w}", "response": w} for w in ("a", "b", "c", "d", "e", "f", "g", "h")]
    cfg = {"model": bpe_llama, "method": {"name": "lora", "r": 2, "target_modules": ["q_proj"]},
           "data": {"train": rows, "eval": 0.25}, "train": {"max_steps": 1, "output_dir": str(tmp_path / "o")}}  # fmt: skip
    tuned = peft_magic.train(cfg, display="none")
    datasets.enable_progress_bars()
    capfd.readouterr()
    prompts = default_prompts(tuned)
    assert "Map" not in capfd.readouterr().err  # no datasets bar in the export's output
    trained = [tuned.tokenizer.decode(ex["input_ids"]) for ex in tuned.data.train]
    assert len(prompts) == 2 and set(prompts) <= {r["prompt"] for r in rows}
    assert not any(p + "<" in t or p + "\n" in t for p in prompts for t in trained)  # held out, never trained


def test_magic_writes_gguf_and_says_so_in_one_line(shell, run, tmp_path, capsys):  # noqa: F811
    shell.user_ns["tuned"] = run
    shell.run_line_magic("peft_export", f"tuned {tmp_path / 'm'} --gguf q8_0 --no-parity")
    out = capsys.readouterr().out.strip()
    assert out == f"exported adapter of 'run' to {tmp_path / 'm'} (+ run-q8_0.gguf)"
    assert run.last_export.parity == [] and os.path.isfile(tmp_path / "m" / "run-q8_0.gguf")


def test_magic_shows_the_parity_table_in_the_terminal_and_in_the_notebook(shell, run, tmp_path, capsys):  # noqa: F811
    """%peft_export --gguf prints the table (terminal) or displays it as HTML (notebook), verdict included."""
    from IPython.utils.capture import capture_output

    shell.user_ns["tuned"] = run
    shell.peft.display = "terminal"
    shell.run_line_magic("peft_export", f"tuned {tmp_path / 't'} --gguf f32")
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"exported adapter of 'run' to {tmp_path / 't'} (+ run-f32.gguf)")
    if not HAS_LLAMA_CPP:
        assert "parity check skipped: llama-cpp-python is not installed. Fix: pip install 'peft-magic[gguf-check]'" in out
        return
    assert "parity: notebook model vs run-f32.gguf in llama.cpp (greedy)" in out
    rows = run.last_export.parity[0].rows
    assert [r.prompt for r in rows] == ["say yes", "say no", "say hello"]  # the run's own prompts
    assert f"  notebook: {rows[0].notebook}\n  gguf:     {rows[0].gguf}\n  same · log-likelihood/token" in out
    assert "the GGUF answers like the notebook model: 3/3 greedy answers identical" in out

    shell.peft.display = "panel"
    with capture_output() as cap:
        shell.run_line_magic("peft_export", f"tuned {tmp_path / 'n'} --gguf f32")
    html = [o.data["text/html"] for o in cap.outputs if "text/html" in o.data]
    assert len(html) == 1 and "<b>GGUF parity</b>: notebook model vs <code>run-f32.gguf</code>" in html[0]
    assert html[0].count("<td style='color:green'>yes</td>") == 3 and "answers like the notebook model: 3/3" in html[0]


def test_a_disagreement_is_said_with_its_likely_cause():
    from peft_magic.gguf.parity import ParityReport, ParityRow

    rows = [ParityRow("say hi", "hello world", "hello world", -0.40, -0.45, True),
            ParityRow("say no", "no", "yes yes", -0.30, -0.62, True)]  # fmt: skip
    coarse = ParityReport(file="/x/run-q4_0.gguf", quant="q4_0", rows=rows)
    assert not coarse.ok and coarse.agreement == 0.5
    assert coarse.verdict == ("the GGUF differs from the notebook model: 1/2 greedy answers identical, log-likelihood "
                              "gap at most 0.320 per token. Likely cause: quantization (q4_0) moves the logits enough "
                              "to change greedy choices. Fix: export q8_0 or f16.")  # fmt: skip
    assert "  DIFFERENT · log-likelihood/token notebook -0.300 · gguf -0.620" in coarse.text()
    html = coarse._repr_html_()
    assert "<td style='color:red'>no</td>" in html and "<p style='color:#b00'>the GGUF differs" in html
    close = [ParityRow("say no", "no", "nope", -0.300, -0.302, True)]
    assert "near-ties in greedy decoding" in ParityReport(file="m.gguf", quant="f16", rows=close).cause
    # a coarse file whose scores agree closely (the q4_1 base the notebook trained on, + adapter) is not blamed
    tie = [ParityRow("six plus nine?", "eight.", "eleven.", -0.461, -0.477, True)]
    assert "near-ties in greedy decoding" in ParityReport(file="m.gguf", quant="q4_1", rows=tie).cause
    lost = [ParityRow("say no", "no", "???", -0.3, -3.1, False)]
    assert ParityReport(file="m.gguf", quant="q8_0", rows=lost).cause.startswith("llama.cpp builds a different prompt")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--gguf q4_l", r"unknown GGUF quantization 'q4_l': did you mean 'q4_1'\?"),
        ("--push-to-hub me/my:model", r"'me/my:model' is not a Hub repo id: use only letters"),
        ("--push-to-hub just-a-name", r"'just-a-name' is not a Hub repo id: it must be 'user/name'"),
    ],
)
def test_magic_refuses_bad_requests_before_writing(shell, run, tmp_path, flags, message):  # noqa: F811
    from IPython.core.error import UsageError

    shell.user_ns["tuned"] = run
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("peft_export", f"tuned {tmp_path / 'x'} {flags}")
    assert os.listdir(tmp_path) == []


def test_gguf_adapter_of_an_ia3_run_suggests_the_merged_gguf(bpe_llama, tmp_path):  # noqa: F811
    cfg = {"model": bpe_llama, "method": {"name": "ia3"}, "data": {"train": instruction_rows(8)},
           "train": {"max_steps": 1, "output_dir": str(tmp_path / "o")}}  # fmt: skip
    tuned = peft_magic.train(cfg, display="none")
    with pytest.raises(ConfigError, match=r"GGUF adapter holds LoRA matrices, and this run's method is ia3.*--gguf q8_0"):
        tuned.export(str(tmp_path / "x"), gguf_adapter=True, display="none")
    assert not os.path.exists(tmp_path / "x")
    path = tuned.export(str(tmp_path / "merged"), gguf="f16", parity=False, display="none")  # what it suggests works
    assert os.path.isfile(os.path.join(path, "run-f16.gguf"))


def test_gguf_without_the_gguf_package_is_refused_before_work(run, tmp_path, monkeypatch):  # noqa: F811
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    for kwargs in ({"gguf": "q8_0"}, {"gguf_adapter": True}):
        with pytest.raises(ConfigError, match=r"GGUF export needs the gguf package, which is not installed. Fix: pip "
                                              r"install gguf"):  # fmt: skip
            run.export(str(tmp_path / "x"), display="none", **kwargs)
    assert not os.path.exists(tmp_path / "x")


def test_gguf_of_a_classifier_is_refused_before_work(tiny_bert, sentiment, tmp_path):
    cfg = {"model": tiny_bert, "task": "seq-cls", "method": {"name": "lora", "r": 2},
           "data": {"train": sentiment.head(16)}, "train": {"max_steps": 1, "output_dir": str(tmp_path / "o")}}  # fmt: skip
    tuned = peft_magic.train(cfg, display="none")
    with pytest.raises(ConfigError, match=r"GGUF export is for causal-lm runs.*seq-cls"):
        tuned.export(str(tmp_path / "x"), gguf="q8_0", display="none")
    assert not os.path.exists(tmp_path / "x")


def test_unwritable_folder_is_refused_before_work(run, tmp_path, monkeypatch):  # noqa: F811
    real = os.access
    locked = str(tmp_path / "locked")
    os.makedirs(locked)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == locked else real(p, mode))  # root ignores chmod
    with pytest.raises(ConfigError, match=r"cannot write in .*locked.* \(permission denied\)"):
        run.export(os.path.join(locked, "exp"), gguf="q8_0", display="none")
    assert os.listdir(locked) == []


def test_full_disk_mid_gguf_keeps_the_previous_export(run, tmp_path, monkeypatch):  # noqa: F811
    import gguf

    target = str(tmp_path / "exp")
    run.export(target, display="none")
    before = sorted(os.listdir(target))
    real, written = gguf.GGUFWriter.write_tensor_data, []

    def fill_up(self, tensor, *a, **kw):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(1)
        return real(self, tensor, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_up)
    with pytest.raises(ConfigError, match=r"could not write .*No space left on device.*previous export there is intact"):
        run.export(target, overwrite=True, gguf="f32", display="none")
    assert sorted(os.listdir(target)) == before and os.listdir(tmp_path) == ["exp"]


def test_cli_refuses_a_bad_quantization_before_training(tmp_path, capsys, monkeypatch):
    import importlib.util

    from peft_magic.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: nowhere/not-loaded\ndata: {train: x.jsonl}\n")
    assert main(["train", str(cfg), "--export", str(tmp_path / "e"), "--gguf", "q8"]) == 2
    assert "did you mean 'q8_0'?" in capsys.readouterr().err
    assert main(["train", str(cfg), "--gguf", "q8_0"]) == 2
    assert "--gguf needs --export DIR" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    assert main(["train", str(cfg), "--export", str(tmp_path / "e"), "--gguf-adapter"]) == 2
    assert "GGUF export needs the gguf package, which is not installed. Fix: pip install gguf" in capsys.readouterr().err


def test_cli_trains_and_writes_the_gguf_with_its_parity_table(bpe_llama, tmp_path, capsys):  # noqa: F811
    import json

    from peft_magic.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(16)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {bpe_llama}\nmethod: {{name: lora, r: 2, target_modules: all-linear}}\n"
                   f"data: {{train: {data}}}\ntrain: {{max_steps: 2, output_dir: {tmp_path / 'out'}}}\n")  # fmt: skip
    assert main(["train", str(cfg), "--export", str(tmp_path / "e"), "--gguf", "f16", "--gguf-adapter"]) == 0
    out = capsys.readouterr().out
    assert {"run-f16.gguf", "run-adapter.gguf", "base-f16.gguf", "Modelfile", "Modelfile.adapter"} <= set(
        os.listdir(tmp_path / "e"))  # fmt: skip
    assert f"exported to {tmp_path / 'e'}" in out
    if HAS_LLAMA_CPP:
        assert "parity: notebook model vs run-f16.gguf in llama.cpp (greedy)" in out
        assert "parity: notebook model vs base-f16.gguf + run-adapter.gguf in llama.cpp (greedy)" in out
    else:
        assert "parity check skipped" in out


def test_form_export_button_writes_the_gguf(run, tmp_path):  # noqa: F811
    from peft_magic.ui.form import Form

    form = Form({"model": "x"}, name="run", namespace={}, preflight_delay=None)
    form.run = run
    form.export_gguf.value = "q8_0"
    path = form.export(str(tmp_path / "f"))
    assert path and os.path.isfile(os.path.join(path, "run-q8_0.gguf"))
    assert "run-q8_0.gguf" in form.message.value and form.error.value == ""
    # the button itself: the Export tab's folder, q4_0 and the adapter GGUF, the parity tables under the message
    form.export_dir.value, form.export_gguf.value, form.export_gguf_adapter.value = str(tmp_path / "b"), "q4_0", True
    form.export_button.click()
    assert form.error.value == "" and {"run-q4_0.gguf", "run-adapter.gguf", "Modelfile.adapter"} <= set(os.listdir(tmp_path / "b"))
    if HAS_LLAMA_CPP:  # the parity tables of both files, under the message
        assert form.message.value.count("<b>GGUF parity</b>") == 2 and "run-q4_0.gguf" in form.message.value
    else:
        assert "parity check skipped: llama-cpp-python is not installed" in form.message.value
    form.export_gguf.value, form.export_overwrite.value = "f16", False
    form.export_button.click()  # the folder holds files now: refused in the form, nothing replaced
    assert "already holds files" in form.error.value and not os.path.exists(tmp_path / "b" / "run-f16.gguf")


# ---------------------------------------------------------------- the Hub, offline
class FakeHub:
    """Records what `huggingface_hub.HfApi` would be asked to do."""

    def __init__(self):
        self.calls, self.uploaded = [], []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw.get("private")))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), token=None, **kw):
        import fnmatch

        assert token == FAKE_TOKEN  # the token reaches huggingface_hub...
        for root, _dirs, files in os.walk(folder_path):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), folder_path)
                if not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns):
                    self.uploaded.append(rel)


def test_push_uploads_every_file_and_no_file_holds_the_token(run, tmp_path, monkeypatch):  # noqa: F811
    from peft_magic.export import hub

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    fake = FakeHub()
    monkeypatch.setattr(hub, "push_folder", _with_api(hub.push_folder, fake))
    path = run.export(str(tmp_path / "exp"), gguf="q8_0", gguf_adapter=True, parity=False, display="none",
                      push_to_hub="me/tiny-model", private=True)  # fmt: skip
    assert fake.calls == [("create_repo", "me/tiny-model", True)]
    assert sorted(fake.uploaded) == sorted(os.listdir(path))  # adapter, GGUF files, Modelfiles, card
    assert run.last_export.hub_url == "https://huggingface.co/me/tiny-model"
    assert FAKE_TOKEN.encode() not in _all_text(path)


def _with_api(push, api):
    def push_with(folder, repo_id, private=False, api_=None, message=None):
        return push(folder, repo_id, private=private, api=api, message=message)

    return push_with


def test_push_without_a_token_is_refused_before_work(run, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    with pytest.raises(ConfigError, match=r"no Hugging Face token found.*Fix: set HF_TOKEN .*hf auth login"):
        run.export(str(tmp_path / "exp"), gguf="q8_0", push_to_hub="me/tiny", display="none")
    assert not os.path.exists(tmp_path / "exp")


def test_failed_upload_is_one_line_and_the_export_stays(run, tmp_path, monkeypatch):  # noqa: F811
    """The real HfApi, with the Hub switched off (HF_HUB_OFFLINE=1, as on these machines)."""
    import huggingface_hub.constants

    from peft_magic.export.hub import HubError

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    target = str(tmp_path / "exp")
    with pytest.raises(HubError) as err:
        run.export(target, gguf="q8_0", parity=False, push_to_hub="me/tiny", display="none")
    message = str(err.value)
    assert "\n" not in message and FAKE_TOKEN not in message
    assert message.startswith("push_to_hub: the upload to me/tiny failed") and f"the export in '{target}' is intact" in message
    assert f"hf upload me/tiny {target}" in message
    assert "run-q8_0.gguf" in os.listdir(target) and run.last_export.folder == target


class RefusingHub(FakeHub):
    """A Hub that answers the upload with an HTTP error (its message echoing the token, as a careless proxy may)
    or a dropped connection."""

    def __init__(self, status):
        super().__init__()
        self.status = status

    def upload_folder(self, **kw):
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError

        request = httpx2.Request("POST", "https://huggingface.co/api/models/me/tiny/commit/main")
        if self.status is None:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
        raise HfHubHTTPError(f"{self.status} Client Error for url {request.url} (Authorization: Bearer {FAKE_TOKEN})",
                             response=httpx2.Response(self.status, request=request))  # fmt: skip


@pytest.mark.parametrize(("status", "fix"), [
    (401, "the token was refused: set HF_TOKEN to a write token"),
    (403, "the token cannot write there: use a token with write access"),
    (None, "check the network connection"),
])  # fmt: skip
def test_hub_refusals_are_one_line_with_the_fix_and_never_show_the_token(shell, run, tmp_path, monkeypatch,
                                                                         capsys, status, fix):  # noqa: F811
    from IPython.core.error import UsageError

    from peft_magic.export import hub

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hub, "push_folder", _with_api(hub.push_folder, RefusingHub(status)))
    shell.user_ns["tuned"] = run
    target = tmp_path / "exp"
    with pytest.raises(UsageError) as err:
        shell.run_line_magic("peft_export", f"tuned {target} --gguf q8_0 --no-parity --push-to-hub me/tiny")
    message = str(err.value)
    assert "\n" not in message and f"Fix: {fix}" in message and f"hf upload me/tiny {target}" in message
    printed = capsys.readouterr()
    assert FAKE_TOKEN not in message + printed.out + printed.err and FAKE_TOKEN.encode() not in _all_text(target)
    assert {"run-q8_0.gguf", "Modelfile", "README.md"} <= set(os.listdir(target))  # the local export stays


@pytest.mark.parametrize("repo_id", ["me/my model", "me/name/extra", "me/", "-me/x", "me/x--y", "me/x.git"])
def test_hub_ids_with_a_typo_are_refused(repo_id):
    from peft_magic.export.hub import HubError, check_repo_id

    with pytest.raises(HubError, match=r"is not a Hub repo id: .*Fix: e.g. --push-to-hub your-name/my-model"):
        check_repo_id(repo_id)
    assert check_repo_id(" me/my-model.v2 ") == "me/my-model.v2"
