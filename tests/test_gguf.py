"""GGUF export (peft_magic.gguf) on a tiny random Llama with a byte-level BPE tokenizer, trained for real:
the merged file reloads through transformers' own GGUF loader to the notebook model's logits, the LoRA file reads
back with gguf's reader, the tokenizer survives the trip, llama.cpp (when installed) answers like the notebook,
and bad requests are refused in one line before anything is written."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import WORDS, instruction_rows

import peft_magic
from peft_magic.errors import ConfigError

gguf = pytest.importorskip("gguf")
TEXT = "say hello the cat sat on the mat 123"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer (the SmolLM2 / Llama 3 / Qwen kind) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([" ".join(WORDS + ["user", "assistant", "system"])] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")  # fmt: skip
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)  # fmt: skip
    path = tmp_path_factory.mktemp("bpe-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def run(bpe_llama, tmp_path_factory):
    cfg = {"model": bpe_llama, "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
           "data": {"train": instruction_rows()},
           "train": {"max_steps": 30, "learning_rate": 1e-2, "logging_steps": 10,
                     "output_dir": str(tmp_path_factory.mktemp("out"))}}  # fmt: skip
    return peft_magic.train(cfg, display="none")


def _ids(run):
    return torch.tensor([run.tokenizer(TEXT)["input_ids"]])


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _merged(run):
    return run.method.merge(copy.deepcopy(run.model))


def _reload(path):
    from transformers import AutoModelForCausalLM

    from peft_magic.models import quiet_loading

    with quiet_loading():
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()  # fmt: skip


def test_merged_f32_reloads_to_the_notebook_logits(run, tmp_path):
    from peft_magic.gguf.merged import write_merged_gguf

    path = write_merged_gguf(_merged(run), run.tokenizer, str(tmp_path / "m-f32.gguf"), "f32")
    ids = _ids(run)
    want = _logits(run.model, ids)
    got = _logits(_reload(path), ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert os.listdir(tmp_path) == ["m-f32.gguf"]  # and no .partial file left behind


# Q8_0 stores each block of 32 weights as int8 times one scale (absmax / 127): every weight moves by at most half
# a step, 1/254 of its block's largest magnitude. On this model trained from three seeds that moved the logits by
# 0.8%, 1.2% and 1.1% of their largest magnitude; q4_1 moved them by 5%, 18% and 13% (measured by
# benchmarks/gguf_quant_error.py). 3% sits between: room for other seeds, yet a file silently written coarser, or
# a wrong layout (which moves them by the whole range), fails.
Q8_0_RELATIVE_BOUND = 0.03


def test_merged_q8_0_stays_within_the_quantization_error(run, tmp_path):
    from peft_magic.gguf.merged import write_merged_gguf

    path = write_merged_gguf(_merged(run), run.tokenizer, str(tmp_path / "m-q8_0.gguf"), "q8_0")
    ids = _ids(run)
    want, got = _logits(run.model, ids), _logits(_reload(path), ids)
    assert (got - want).abs().max().item() <= Q8_0_RELATIVE_BOUND * want.abs().max().item()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert os.path.getsize(path) < 0.4 * os.path.getsize(write_merged_gguf(_merged(run), run.tokenizer, str(tmp_path / "f32.gguf"), "f32"))


def test_lora_gguf_reads_back_with_names_shapes_types_and_alpha(run, tmp_path):
    from peft_magic.gguf.arch import permute_rows
    from peft_magic.gguf.lora import write_lora_gguf

    path = write_lora_gguf(run.model, str(tmp_path / "adapter.gguf"))
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", "adapter."))}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {f"blk.{b}.{k}.weight.lora_{ab}" for b in range(2) for k in kinds for ab in "ab"}
    assert all(t.tensor_type.name == "F32" for t in tensors.values())
    layer = run.model.base_model.model.model.layers[1].self_attn
    a, b = layer.k_proj.lora_A["default"].weight, layer.k_proj.lora_B["default"].weight
    assert list(tensors["blk.1.attn_k.weight.lora_a"].shape) == [64, 4]  # ggml order: (in, r)
    assert list(tensors["blk.1.attn_k.weight.lora_b"].shape) == [4, 32]  # (r, out): 2 kv heads x 16
    got_a = np.asarray(tensors["blk.1.attn_k.weight.lora_a"].data).reshape(a.shape)
    got_b = np.asarray(tensors["blk.1.attn_k.weight.lora_b"].data).reshape(b.shape)
    np.testing.assert_array_equal(got_a, a.detach().numpy())
    np.testing.assert_array_equal(got_b, permute_rows(b.detach().numpy(), 4, 2))  # rows reordered like the base's
    v_b = np.asarray(tensors["blk.1.attn_v.weight.lora_b"].data)
    np.testing.assert_array_equal(v_b.reshape(-1), layer.v_proj.lora_B["default"].weight.detach().numpy().reshape(-1))


def test_tokenizer_round_trip(run, tmp_path):
    """Vocabulary, special tokens and chat template in the file equal the tokenizer's; transformers rebuilds a
    tokenizer from the file that encodes and renders like the original."""
    from transformers import AutoTokenizer

    from peft_magic.gguf.merged import write_merged_gguf
    from peft_magic.models import quiet_loading

    tok = run.tokenizer
    path = write_merged_gguf(_merged(run), tok, str(tmp_path / "m.gguf"), "q8_0")
    reader = gguf.GGUFReader(path)
    field = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    vocab = tok.get_vocab()
    assert field["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert field["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert field["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert field["tokenizer.chat_template"] == tok.chat_template
    types = field["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[vocab["the"]] == gguf.TokenType.NORMAL
    with quiet_loading():
        back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert back(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    msgs = [{"role": "user", "content": "say hello"}]
    assert back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_modelfile_template_renders_the_chat_template(run):
    from peft_magic.gguf.ollama import modelfile, ollama_template

    template, stops = ollama_template(run.tokenizer)
    assert stops == ["<|im_end|>"]
    assert "{{ .Prompt }}" in template and "{{ .System }}" in template
    user_only = template.split("{{ else }}")[1].split("{{ end }}")[0].replace("{{ .Prompt }}", "say hello")
    assert user_only == run.tokenizer.apply_chat_template([{"role": "user", "content": "say hello"}], tokenize=False,
                                                          add_generation_prompt=True)  # fmt: skip
    text = modelfile(run.tokenizer, "./model-q8_0.gguf", "./adapter.gguf", name="tiny")
    assert "FROM ./model-q8_0.gguf\nADAPTER ./adapter.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "ollama create tiny -f Modelfile" in text


# ---------------------------------------------------------------- llama.cpp, when llama-cpp-python is installed
def test_llama_cpp_answers_like_the_notebook_merged_and_adapter(run, tmp_path):
    pytest.importorskip("llama_cpp")
    from peft_magic.gguf.lora import base_state_dict, write_lora_gguf
    from peft_magic.gguf.merged import write_merged_gguf
    from peft_magic.gguf.parity import check_parity

    prompts = ["say hello", "say yes", "say ok"]
    merged = write_merged_gguf(_merged(run), run.tokenizer, str(tmp_path / "m.gguf"), "f32")
    report = check_parity(run.model, run.tokenizer, merged, prompts, max_new_tokens=6, quant="f32")
    assert report.ok, report.text()
    assert [r.notebook for r in report.rows] == [run.generate(p, max_new_tokens=6) for p in prompts]
    assert report.max_ll_gap < 1e-3 and all(r.same_prompt_tokens for r in report.rows)
    base = write_merged_gguf(run.model, run.tokenizer, str(tmp_path / "base.gguf"), "f32", state=base_state_dict(run.model))
    adapter = write_lora_gguf(run.model, str(tmp_path / "adapter.gguf"))
    report = check_parity(run.model, run.tokenizer, base, prompts, lora_path=adapter, max_new_tokens=6)
    assert report.ok and report.max_ll_gap < 1e-3, report.text()
    assert "answers like the notebook model: 3/3" in report.verdict and "<table>" in report._repr_html_()
    without = check_parity(run.model, run.tokenizer, base, prompts, max_new_tokens=6)  # the base alone: worse
    assert np.mean([r.ll_gguf for r in without.rows]) < np.mean([r.ll_gguf for r in report.rows]) - 0.1


def test_parity_names_a_lost_template_as_the_cause(run, tmp_path):
    pytest.importorskip("llama_cpp")
    from peft_magic.gguf.merged import write_merged_gguf
    from peft_magic.gguf.parity import check_parity

    tok = copy.deepcopy(run.tokenizer)
    tok.chat_template = None  # a file written without the template, as broken converters do
    path = write_merged_gguf(_merged(run), tok, str(tmp_path / "m.gguf"), "f32")
    report = check_parity(run.model, run.tokenizer, path, ["say hello"], max_new_tokens=6)
    assert not report.rows[0].same_prompt_tokens
    assert report.cause.startswith("llama.cpp builds a different prompt (chat template or tokenizer differs")


def test_parity_is_skipped_with_one_line_without_llama_cpp(run, tmp_path, monkeypatch):
    from peft_magic.gguf import parity

    monkeypatch.setattr(parity, "available", lambda: False)
    report = parity.check_parity(run.model, run.tokenizer, str(tmp_path / "x.gguf"), ["say hello"])
    assert report.skipped and "gguf-check" in report.verdict and "\n" not in report.verdict


# ---------------------------------------------------------------- refusals: one line, before any work
def test_unknown_quantization_suggests_the_closest():
    from peft_magic.gguf.quant import parse_quant

    with pytest.raises(ConfigError, match=r"unknown GGUF quantization 'q8': did you mean 'q8_0'\?"):
        parse_quant("q8")
    for typo, meant in (("q4km", "q4_k_m"), ("Q8_O", "q8_0"), ("f61", "f16"), ("q6k", "q6_k")):
        with pytest.raises(ConfigError, match=rf"unknown GGUF quantization '{typo}': did you mean '{meant}'\? "
                                              r"Choose one of f32, f16, bf16, q8_0"):  # fmt: skip
            parse_quant(typo)
    assert parse_quant("Q4-1").name == "q4_1"


def test_k_quant_without_its_quantizer_is_refused(monkeypatch):
    from peft_magic.gguf import quant

    monkeypatch.setattr(quant, "k_quantizer_available", lambda: False)
    for name in ("q4_k_m", "Q5_K_M", "q6_k"):
        with pytest.raises(ConfigError, match=rf"'{name.lower()}' needs llama.cpp's K-quant quantizer .*llama-cpp-"
                                              r"python is not installed. Fix: pip install 'peft-magic\[gguf-check\]'"
                                              r", or choose q4_1, q5_1 or q8_0"):  # fmt: skip
            quant.parse_quant(name)


def test_unsupported_architecture_lists_the_supported_ones(tiny_bert):
    from transformers import AutoConfig

    from peft_magic.gguf.arch import arch_for

    with pytest.raises(ConfigError, match=r"does not support the 'bert' architecture yet \(supported: llama, "
                                          r"mistral, qwen2, qwen3\)"):  # fmt: skip
        arch_for(AutoConfig.from_pretrained(tiny_bert))


@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_gguf_adapter_refuses_non_lora_methods(bpe_llama, method, tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_magic.gguf.lora import write_lora_gguf

    base = AutoModelForCausalLM.from_pretrained(bpe_llama)
    pcfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]) \
        if method == "ia3" else LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ConfigError, match=r"cannot write a GGUF LoRA adapter: .*(ia3|DoRA).*--gguf q8_0"):
        write_lora_gguf(get_peft_model(base, pcfg), str(tmp_path / "a.gguf"))
    assert os.listdir(tmp_path) == []


def test_full_disk_mid_write_leaves_nothing(run, tmp_path, monkeypatch):
    from peft_magic.gguf.merged import write_merged_gguf

    real, written = gguf.GGUFWriter.write_tensor_data, []

    def fill_up(self, tensor, *a, **kw):
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        written.append(1)
        return real(self, tensor, *a, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_up)
    with pytest.raises(OSError, match="No space left"):
        write_merged_gguf(_merged(run), run.tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert os.listdir(tmp_path) == []


def test_too_little_room_is_refused_before_writing(run, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from peft_magic.gguf.merged import write_merged_gguf

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"not enough disk space for m.gguf: it needs .* GB and .* has 0.00 GB free"):
        write_merged_gguf(_merged(run), run.tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("name", "weights", "output"), [("q4_k_m", "Q4_K", "Q6_K"), ("q5_k_m", "Q5_K", "Q6_K"),
                                                         ("q6_k", "Q6_K", "Q6_K")])  # fmt: skip
def test_k_quants_are_written_by_llama_cpps_quantizer(name, weights, output, tmp_path):
    """With llama-cpp-python installed, the K-quants are accepted: an f16 file, then llama.cpp's quantizer (the
    `_m` mixes keep attn_v, ffn_down and the output at Q6_K, as llama-quantize does); the result loads in llama.cpp
    and scores text like the model (K-quant blocks are 256 wide, hence the wider model)."""
    pytest.importorskip("llama_cpp")
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_magic.gguf.merged import write_merged_gguf
    from peft_magic.gguf.parity import LlamaCpp, notebook_loglik

    tok = make_bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # logits far from uniform, so the log-likelihood sees the weights
    path = write_merged_gguf(model, tok, str(tmp_path / "m.gguf"), name)
    assert os.listdir(tmp_path) == ["m.gguf"]  # the f16 intermediate is gone
    reader = gguf.GGUFReader(path)
    assert gguf.LlamaFileType(reader.get_field("general.file_type").contents()).name == f"MOSTLY_{name.upper()}"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == weights
    assert types["output.weight"] == types["blk.0.attn_v.weight"] == output and types["blk.0.attn_norm.weight"] == "F32"
    ids = tok(TEXT)["input_ids"]
    cpp = LlamaCpp(path, n_ctx=128)
    try:
        got = cpp.mean_loglik(ids[:3], ids[3:])
    finally:
        cpp.close()
    want = notebook_loglik(model, ids[:3], ids[3:])
    assert want < -7 and abs(got - want) < 0.1  # measured 0.02 (q4_k_m), 0.04 (q5_k_m), 0.001 (q6_k) per token
