"""How far each GGUF quantization moves the logits of a tiny trained Llama (the figures behind the q8_0 bound in
tests/test_gguf.py): max |logit difference| after a reload through transformers' GGUF loader, relative to the
largest logit, for a few seeds.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/gguf_quant_error.py [--seeds 3] [--quants q8_0,q5_1,q4_1]
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quants", default="f32,q8_0,q5_1,q4_1")
    args = parser.parse_args()
    import torch
    from conftest import instruction_rows
    from test_gguf import _ids, _logits, _merged, _reload, make_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_magic
    from peft_magic.gguf.merged import write_merged_gguf

    torch.set_num_threads(1)
    d, tok = tempfile.mkdtemp(), make_bpe_tokenizer()
    print("seed  quant  max|diff|  max|logit|  relative")
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=False)  # fmt: skip
        path = f"{d}/m{seed}"
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        run = peft_magic.train({"model": path, "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                                "data": {"train": instruction_rows()},
                                "train": {"max_steps": 30, "learning_rate": 1e-2, "output_dir": f"{d}/o{seed}"}}, display="none")  # fmt: skip
        ids = _ids(run)
        want = _logits(run.model, ids)
        for q in args.quants.split(","):
            got = _logits(_reload(write_merged_gguf(_merged(run), run.tokenizer, f"{d}/x{seed}{q}.gguf", q)), ids)
            diff, top = (got - want).abs().max().item(), want.abs().max().item()
            print(f"{seed:>4}  {q:<5}  {diff:9.5f}  {top:10.4f}  {diff / top:8.2%}")


if __name__ == "__main__":
    main()
