"""The Ollama Modelfile for each chat-template family (ChatML, Llama 3, Mistral, Gemma, plain): its TEMPLATE,
rendered the way Ollama fills it in, gives the very prompt text the tokenizer's own chat template gives (less the
BOS token that llama.cpp adds itself), and its stop tokens end the assistant's turn. The templates are the ones
the families ship (SmolLM2's ChatML with its default system prompt, Llama 3 Instruct, Mistral Instruct v0.1,
Gemma Instruct), on tiny byte-level BPE tokenizers that carry each family's special tokens."""

from __future__ import annotations

import pytest
from conftest import WORDS

pytest.importorskip("gguf")

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
          " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
          "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # fmt: skip
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) "
           "%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
           "message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
           "user and assistant roles are supported!') }}{% endif %}{% endfor %}")  # fmt: skip
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
         "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
         "(message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% "
         "endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")  # fmt: skip

# family: (chat template, special tokens, bos, eos, whether the tokenizer adds BOS, end-of-turn stops, system turn)
FAMILIES = {
    "ChatML": (SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", False,
               ["<|im_end|>"], True),
    "Llama 3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", True,
                ["<|eot_id|>", "<|end_of_text|>"], True),
    "Mistral": (MISTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", True, ["</s>"], False),
    "Gemma": (GEMMA, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", True,
              ["<end_of_turn>", "<eos>"], False),
    "plain": (None, ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", False, ["<|endoftext|>"], False),
}  # fmt: skip


def family_tokenizer(template, specials, bos, eos, adds_bos):
    """A byte-level BPE tokenizer with the family's special tokens, chat template and BOS behaviour (a
    post-processor that puts BOS first, as the Llama 3, Mistral and Gemma tokenizers have)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([" ".join(WORDS + ["user", "assistant", "system", "model"])] * 20, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    fast.chat_template = template
    return fast


def ollama_render(template: str, prompt: str, system: str | None = None) -> str:
    """What Ollama sends to the model for one user turn: the Go template's `if .System` branch chosen and the
    `.System`/`.Prompt` fields filled in (the subset of Go templates the Modelfile uses)."""
    if "{{ if .System }}" in template:
        head, rest = template.split("{{ if .System }}", 1)
        with_system, rest = rest.split("{{ else }}", 1)
        without, tail = rest.split("{{ end }}", 1)
        template = head + (with_system if system else without) + tail
    assert "{{" not in template.replace("{{ .System }}", "").replace("{{ .Prompt }}", "").replace("{{ .Response }}", "")
    return template.replace("{{ .System }}", system or "").replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", "")


def hf_render(tok, messages, adds_bos):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text[len(tok.bos_token):] if adds_bos and text.startswith(tok.bos_token) else text


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modelfile_template_gives_the_prompt_the_tokenizer_gives(family):
    from peft_magic.gguf.ollama import adds_bos, modelfile, ollama_template, template_family

    template, specials, bos, eos, bos_added, stops, has_system = FAMILIES[family]
    tok = family_tokenizer(template, specials, bos, eos, bos_added)
    assert template_family(tok) == family and adds_bos(tok) is bos_added
    go, got_stops = ollama_template(tok)
    assert got_stops == stops
    user = [{"role": "user", "content": "say hello"}]
    if template is None:
        assert go == "{{ .Prompt }}{{ .Response }}" or go == "{{ .Prompt }}"
        assert ollama_render(go, "say hello") == "say hello"
    else:
        assert ollama_render(go, "say hello") == hf_render(tok, user, bos_added)
        assert not ollama_render(go, "say hello").startswith(bos) or not bos_added  # llama.cpp adds BOS: not twice
    if has_system:
        system = [{"role": "system", "content": "be brief"}] + user
        assert ollama_render(go, "say hello", "be brief") == hf_render(tok, system, bos_added)
    else:
        assert "{{ .System }}" not in go  # the family has no system turn: Ollama's system prompt is not invented
    text = modelfile(tok, "./m.gguf", name="tiny")
    assert text.startswith(f"# Ollama Modelfile written by peft_magic ({family} prompt format).\n")
    assert "# Create the model:  ollama create tiny -f Modelfile\n" in text and "\nFROM ./m.gguf\n" in text
    for stop in stops:
        assert f'PARAMETER stop "{stop}"' in text


def test_plain_text_runs_get_the_plain_template_whatever_the_tokenizer():
    """A run trained on plain text (no chat template applied in the notebook) is prompted with the bare text."""
    from peft_magic.gguf.ollama import modelfile, ollama_template

    tok = family_tokenizer(*FAMILIES["Llama 3"][:5])
    go, stops = ollama_template(tok, chat=False)
    assert ollama_render(go, "say hello") == "say hello" and stops == ["<|end_of_text|>"]
    assert "(plain prompt format)" in modelfile(tok, "./m.gguf", chat=False)


@pytest.mark.parametrize("family", ["Llama 3", "Mistral", "Gemma", "ChatML"])
def test_gguf_says_whether_bos_is_added_as_the_tokenizer_does(family, tmp_path):
    """The merged GGUF's add_bos_token matches the tokenizer, so llama.cpp's BOS and the Modelfile's template
    (BOS dropped exactly when llama.cpp adds it) never double it or lose it."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_magic.gguf.merged import write_merged_gguf

    template, specials, bos, eos, bos_added, _stops, _sys = FAMILIES[family]
    tok = family_tokenizer(template, specials, bos, eos, bos_added)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    path = write_merged_gguf(LlamaForCausalLM(cfg), tok, str(tmp_path / "m.gguf"), "f32")
    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.add_bos_token")
    assert (field is not None and bool(field.contents())) is bos_added
    assert gguf.GGUFReader(path).get_field("tokenizer.chat_template").contents() == template or template is None
