"""Selective methods (bitfit, layers, head-only, sparse) and L2-SP on tiny random models, trained with a plain
torch loop + AdamW: each changes only what it claims, lowers the loss, and round-trips through its delta format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from peft_magic.config.parse import parse_config
from peft_magic.errors import ConfigError
from peft_magic.methods import get_method
from peft_magic.methods.delta import CONFIG_NAME, WEIGHTS_NAME, is_delta_dir
from peft_magic.methods.selective import STATE_ATTR, find_block_lists, get_state

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
}
BERT = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "max_position_embeddings": 64,
}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Pretrained-looking bases on disk: a Llama with biases, one without, and a bare BERT body (so that loading
    it for seq-cls initialises a fresh random head, as with a real hub model). The Llamas use initializer_range
    0.1: with the default 0.02 the random logits are so flat that bias-only training barely moves the loss."""
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA, attention_bias=True, mlp_bias=True)).save_pretrained(root / "llama")
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(root / "llama-nobias")
    BertModel(BertConfig(**BERT)).save_pretrained(root / "bert")
    return root


def load_base(base_dirs, kind):
    if kind == "bert":
        return BertForSequenceClassification.from_pretrained(base_dirs / "bert", num_labels=3)
    return LlamaForCausalLM.from_pretrained(base_dirs / kind)


def task_of(kind):
    return "seq-cls" if kind == "bert" else "causal-lm"


def make_cfg(method, kind="llama", weight_decay=0.0, quantization="none", **params):
    return parse_config({
        "model": {"name_or_path": f"tiny-{kind}", "quantization": quantization},
        "task": task_of(kind),
        "method": {"name": method, **params},
        "data": {"train": [{"text": "unused"}]},
        "train": {"weight_decay": weight_decay, "seed": 0},
    })  # fmt: skip


def make_batches(kind, n=2, seed=1, vocab=None):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        if kind == "bert":
            ids = torch.randint(1, vocab or 100, (4, 10), generator=gen)
            labels = torch.randint(0, 3, (4,), generator=gen)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        else:
            # counting sequences (start, start+1, ...): learnable, so every method can lower the loss
            starts = torch.randint(0, vocab or 64, (4, 1), generator=gen)
            ids = (starts + torch.arange(12)) % (vocab or 64)
            batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def train(model, method, batches, steps=6, lr=1e-2):
    """A plain loop: the engine's contract (loss + method.regularizer) with torch.optim.AdamW, weight decay 0."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        total = 0.0
        for batch in batches:
            loss = model(**batch).loss
            total += loss.item()
            reg = method.regularizer(model)
            (loss if reg is None else loss + reg).backward()
            opt.step()
            opt.zero_grad()
        losses.append(total / len(batches))
    model.eval()
    return losses


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@torch.no_grad()
def logits(model, batches):
    model.eval()
    return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.flatten() for b in batches])


def prepared(base_dirs, method, kind, calibration=True, **params):
    model = load_base(base_dirs, kind)
    cfg = make_cfg(method, kind, **params)
    batches = make_batches(kind)
    m = get_method(method)
    model = m.apply(model, cfg, calibration=(lambda: iter(batches)) if calibration else None)
    return m, model, cfg, batches


# ---------------------------------------------------------------------------- what each method trains

HEAD = {"bert": ("classifier.",), "llama": ()}
DENSE_CASES = [
    # (method, kind, params, which parameter names the method claims to train)
    ("bitfit", "llama", {}, lambda n: n.endswith(".bias")),
    ("bitfit", "bert", {}, lambda n: n.endswith(".bias") or n.startswith("classifier.")),
    ("layers", "llama", {"last_n": 1}, lambda n: n.startswith("model.layers.1.")),
    (
        "layers",
        "bert",
        {"layers": [0], "modules": ["attention"]},
        lambda n: n.startswith(("bert.encoder.layer.0.attention.", "classifier.")),
    ),
    ("head-only", "llama", {}, lambda n: n == "lm_head.weight"),
    ("head-only", "bert", {}, lambda n: n.startswith("classifier.")),
]


@pytest.mark.parametrize("method,kind,params,claims", DENSE_CASES, ids=[f"{c[0]}-{c[1]}" for c in DENSE_CASES])
def test_dense_methods_train_only_what_they_claim(base_dirs, method, kind, params, claims):
    m, model, _, batches = prepared(base_dirs, method, kind, **params)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if claims(n)}
    assert expected and len(expected) < len(names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    before = snapshot(model)
    losses = train(model, m, batches)
    assert losses[-1] < losses[0] * 0.95, losses
    moved = changed(before, model)
    assert moved <= expected, sorted(moved - expected)
    assert len(moved) >= 0.8 * len(expected), sorted(expected - moved)
    trained, total = m.count_trainable(model)
    assert trained == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind,criterion", [("llama", "grad"), ("bert", "fisher"), ("llama", "random")])
def test_sparse_trains_exactly_the_chosen_entries(base_dirs, kind, criterion):
    density = 0.05
    m, model, _, batches = prepared(base_dirs, "sparse", kind, density=density, criterion=criterion)
    state = get_state(model)
    head = [n for n, _ in model.named_parameters() if n.startswith(HEAD[kind])] if HEAD[kind] else []
    for name, p in model.named_parameters():
        if name in head:
            assert p.requires_grad and name not in state.sparse
            continue
        k = round(density * p.numel())
        assert len(state.sparse.get(name, ())) == k, name  # per tensor: density within rounding
        assert p.requires_grad == (k > 0)
        if k:
            assert len(torch.unique(state.sparse[name])) == k

    before = snapshot(model)
    losses = train(model, m, batches)
    assert losses[-1] < losses[0] * 0.98, losses
    moved_entries = 0
    for name, p in model.named_parameters():
        if name in head:
            continue
        diff = (p.detach() != before[name]).reshape(-1)
        mask = torch.zeros_like(diff)
        if name in state.sparse:
            mask[state.sparse[name]] = True
        assert not diff[~mask].any(), f"{name}: entries outside the mask moved"
        moved_entries += int(diff.sum())
    chosen = sum(len(i) for i in state.sparse.values())
    assert moved_entries >= 0.5 * chosen, (moved_entries, chosen)
    assert m.count_trainable(model)[0] == chosen + sum(model.get_parameter(n).numel() for n in head)


def test_sparse_frozen_entries_stay_bit_identical_under_adamw(base_dirs):
    """The masking contract on its own: many AdamW steps (betas, eps, bias correction, grad clipping) and the
    entries outside the mask do not move by a single bit."""
    _, model, _, batches = prepared(base_dirs, "sparse", "llama", calibration=False, density=0.1, criterion="magnitude")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2, betas=(0.8, 0.9), weight_decay=0.0)
    before = snapshot(model)
    model.train()
    for _ in range(10):
        for batch in batches:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            opt.zero_grad()
    state = get_state(model)
    for name, p in model.named_parameters():
        keep = torch.ones(p.numel(), dtype=torch.bool)
        if name in state.sparse:
            keep[state.sparse[name]] = False
        assert torch.equal(p.detach().reshape(-1)[keep], before[name].reshape(-1)[keep]), name
    with pytest.raises(ConfigError) as err:  # why the config forbids weight decay with sparse
        make_cfg("sparse", weight_decay=0.01)
    assert err.value.key == "train.weight_decay"


def test_sparse_criteria_rank_by_what_they_say(base_dirs):
    """grad/fisher never pick embedding rows of tokens absent from the calibration data (their gradient is 0);
    random does; magnitude picks the largest |w|."""
    batches = make_batches("llama", vocab=16)  # only tokens 0..15 occur
    rows = {}
    for criterion in ("grad", "fisher", "random"):
        model = load_base(base_dirs, "llama")
        get_method("sparse").apply(model, make_cfg("sparse", density=0.05, criterion=criterion),
                                   calibration=lambda: iter(batches))  # fmt: skip
        rows[criterion] = get_state(model).sparse["model.embed_tokens.weight"] // LLAMA["hidden_size"]
    assert rows["grad"].max() < 16 and rows["fisher"].max() < 16
    assert rows["random"].max() >= 16

    model = load_base(base_dirs, "llama")
    with pytest.warns(UserWarning, match="magnitude"):  # grad without calibration falls back, and says so
        get_method("sparse").apply(model, make_cfg("sparse", density=0.05), calibration=None)
    state = get_state(model)
    assert state.extra == {"criterion_used": "magnitude"}
    w = model.get_parameter("model.layers.0.mlp.up_proj.weight").detach().abs().reshape(-1)
    picked = torch.zeros_like(w, dtype=torch.bool)
    picked[state.sparse["model.layers.0.mlp.up_proj.weight"]] = True
    assert w[picked].min() >= w[~picked].max()


# ---------------------------------------------------------------------------- L2-SP


def _distance(model, ref, names):
    return sum(float((model.get_parameter(n).detach() - ref[n]).pow(2).sum()) for n in names)


@pytest.mark.parametrize("method,params", [("layers", {"last_n": 1}), ("sparse", {"density": 0.1})])
def test_l2sp_pulls_toward_pretrained_weights(base_dirs, method, params):
    results = {}
    for alpha in (0.0, 1.0):
        torch.manual_seed(0)
        extra = {"l2sp": {"alpha": alpha}} if alpha else {}
        m, model, _, batches = prepared(base_dirs, method, "llama", **params, **extra)
        ref = snapshot(model)
        reg = m.regularizer(model)
        assert (reg is None) == (alpha == 0.0)
        if reg is not None:
            assert float(reg.detach()) == 0.0  # theta == theta_0 right after apply
        train(model, m, batches, lr=3e-2)
        if alpha:
            assert float(m.regularizer(model).detach()) > 0
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        results[alpha] = _distance(model, ref, trainable)
    assert results[1.0] < 0.7 * results[0.0], results


def test_l2sp_leaves_the_fresh_head_alone(base_dirs):
    _, model, _, _ = prepared(base_dirs, "bitfit", "bert", l2sp=0.5)
    theta0 = get_state(model).theta0
    assert theta0 and not any(n.startswith("classifier.") for n in theta0)
    assert all(n.endswith(".bias") for n in theta0)
    with pytest.raises(ConfigError) as err:  # head-only on seq-cls trains only the fresh head: nothing to pull
        make_cfg("head-only", "bert", l2sp=0.5)
    assert err.value.key == "method.l2sp"


# ---------------------------------------------------------------------------- export, reload, merge

ROUNDTRIP = [("bitfit", "bert", {}), ("layers", "llama", {"last_n": 1}), ("head-only", "bert", {}),
             ("head-only", "llama", {}), ("sparse", "llama", {"density": 0.02}), ("sparse", "bert", {"density": 0.02})]  # fmt: skip


@pytest.mark.parametrize("method,kind,params", ROUNDTRIP, ids=[f"{c[0]}-{c[1]}" for c in ROUNDTRIP])
def test_save_load_reproduces_the_trained_model(base_dirs, tmp_path, method, kind, params):
    m, model, cfg, batches = prepared(base_dirs, method, kind, **params)
    train(model, m, batches, steps=3)
    expected = logits(model, batches)
    m.save(model, tmp_path, cfg)

    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format"] == "peft_magic.delta" and meta["version"] == 1 and is_delta_dir(tmp_path)
    assert (meta["method"], meta["params"], meta["task"]) == (method, params, cfg.task)
    assert meta["base_model_name_or_path"] == f"tiny-{kind}"
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    state = get_state(model)
    dense_keys = {k for k in tensors if not k.endswith((".indices", ".values"))}
    assert dense_keys == set(state.dense)
    for name, idx in state.sparse.items():  # only the chosen entries are written
        assert tensors[f"{name}.indices"].dtype == torch.int64
        assert torch.equal(tensors[f"{name}.indices"], idx.cpu())
        assert tensors[f"{name}.values"].shape == idx.shape
    if method == "sparse":
        stored = sum(t.numel() for k, t in tensors.items() if k.endswith(".values"))
        assert stored < 0.03 * sum(p.numel() for p in model.parameters())

    fresh = load_base(base_dirs, kind)
    assert (logits(fresh, batches) - expected).abs().max() > 1e-3  # the delta is what makes the difference
    reloaded = m.load(fresh, tmp_path)
    assert (logits(reloaded, batches) - expected).abs().max() <= 1e-6


def test_merge_gives_a_plain_model_equal_to_the_trained_one(base_dirs, tmp_path):
    m, model, _, batches = prepared(base_dirs, "sparse", "bert", density=0.05)
    train(model, m, batches, steps=3)
    expected = logits(model, batches)
    merged = m.merge(model)
    assert not hasattr(merged, STATE_ATTR)
    assert all(not p._backward_hooks for p in merged.parameters())  # the gradient masks are gone
    assert torch.equal(logits(merged, batches), expected)
    merged.save_pretrained(tmp_path)
    again = BertForSequenceClassification.from_pretrained(tmp_path)
    assert (logits(again, batches) - expected).abs().max() <= 1e-6


def test_load_onto_the_wrong_base_is_a_config_error(base_dirs, tmp_path):
    m, model, cfg, _ = prepared(base_dirs, "layers", "llama", last_n=1)
    m.save(model, tmp_path, cfg)
    with pytest.raises(ConfigError) as err:
        m.load(load_base(base_dirs, "bert"), tmp_path)
    assert err.value.key == "load" and "tiny-llama" in str(err.value)
    with pytest.raises(ConfigError, match="not bitfit"):
        get_method("bitfit").load(load_base(base_dirs, "llama"), tmp_path)


# ---------------------------------------------------------------------------- finding the blocks


def test_block_lists_are_found_generically(base_dirs):
    assert [n for n, _ in find_block_lists(load_base(base_dirs, "llama"))] == ["model.layers"]
    assert [n for n, _ in find_block_lists(load_base(base_dirs, "bert"))] == ["bert.encoder.layer"]
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    assert [n for n, _ in find_block_lists(t5)] == ["decoder.block", "encoder.block"]


# ---------------------------------------------------------------------------- user mistakes

BAD_PARAMS = [
    ("bitfit", {"lr": 1}, "method.lr", None),
    ("bitfit", {"l2sp": -1}, "method.l2sp", None),
    ("bitfit", {"l2sp": "strong"}, "method.l2sp", None),
    ("layers", {"l2sp": {"alpa": 0.1}}, "method.l2sp.alpa", "alpha"),
    ("layers", {"last_n": 0}, "method.last_n", None),
    ("layers", {"last_n": 1, "layers": [0]}, "method.layers", None),
    ("layers", {"layers": ["top"]}, "method.layers", None),
    ("layers", {"modules": [3]}, "method.modules", None),
    ("layers", {"lastn": 2}, "method.lastn", "last_n"),
    ("sparse", {"densty": 0.1}, "method.densty", "density"),
    ("sparse", {"density": 0}, "method.density", None),
    ("sparse", {"density": 1.5}, "method.density", None),
    ("sparse", {"criterion": "fischer"}, "method.criterion", "fisher"),
    ("sparse", {"calibration_batches": 0}, "method.calibration_batches", None),
    ("head-only", {"last_n": 2}, "method.last_n", None),
]


@pytest.mark.parametrize("method,params,key,suggestion", BAD_PARAMS)
def test_bad_params_name_the_key(method, params, key, suggestion):
    with pytest.raises(ConfigError) as err:
        make_cfg(method, **params)
    assert err.value.key == key
    if suggestion:
        assert f"Did you mean '{suggestion}'" in str(err.value)


@pytest.mark.parametrize("method", ["bitfit", "layers", "head-only", "sparse"])
def test_quantized_base_is_refused(method):
    with pytest.raises(ConfigError) as err:
        make_cfg(method, quantization="4bit")
    assert err.value.key == "model.quantization"


@pytest.mark.parametrize("method,kind,params,key", [
    ("layers", "llama", {"layers": [5]}, "method.layers"),
    ("layers", "llama", {"modules": ["ffn"]}, "method.modules"),  # Llama calls it mlp
    ("bitfit", "llama-nobias", {}, "method.name"),
])  # fmt: skip
def test_apply_time_mistakes_name_the_key(base_dirs, method, kind, params, key):
    model = load_base(base_dirs, kind)
    with pytest.raises(ConfigError) as err:
        get_method(method).apply(model, make_cfg(method, "llama", **params))
    assert err.value.key == key


# ---------------------------------------------------------------------------- what the engine and export rely on


def test_merge_of_a_deep_copy_leaves_the_trained_model_masked(base_dirs):
    """Export with --merge merges a deep copy; the run's own model must keep training under its masks."""
    import copy

    m, model, _, batches = prepared(base_dirs, "sparse", "llama", calibration=False, density=0.1, criterion="random")
    merged = m.merge(copy.deepcopy(model))
    assert not hasattr(merged, STATE_ATTR) and get_state(model) is not None
    before = snapshot(model)
    train(model, m, batches, steps=2)
    state = get_state(model)
    for name, p in model.named_parameters():
        keep = torch.ones(p.numel(), dtype=torch.bool)
        keep[state.sparse.get(name, torch.tensor([], dtype=torch.long))] = False
        assert torch.equal(p.detach().reshape(-1)[keep], before[name].reshape(-1)[keep]), name


def test_resume_adopts_the_checkpoint_entries(base_dirs, tmp_path):
    """load_weights (resume) restores a sparse checkpoint into a model whose own selection differs."""
    m, model, cfg, batches = prepared(base_dirs, "sparse", "llama", density=0.05, criterion="random", l2sp=0.1)
    train(model, m, batches, steps=2)
    m.save(model, tmp_path, cfg)
    other = get_method("sparse").apply(load_base(base_dirs, "llama"), _reseeded(cfg))  # another random draw
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(get_state(other).sparse[name], get_state(model).sparse[name])
    m.load_weights(other, tmp_path)
    assert torch.equal(get_state(other).sparse[name], get_state(model).sparse[name])
    assert torch.equal(logits(other, batches), logits(model, batches))
    assert torch.allclose(m.regularizer(other).detach(), m.regularizer(model).detach())


def _reseeded(cfg):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.train.seed = 123
    return cfg


@pytest.mark.parametrize("method,params", [("bitfit", {}), ("layers", {"last_n": 1}), ("head-only", {}),
                                           ("sparse", {"density": 0.01})])  # fmt: skip
def test_apply_works_on_the_meta_device_for_the_dry_run(method, params):
    """The dry run builds the model without weights; apply must still give exact trainable counts."""
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(**BERT, num_labels=3))
    m = get_method(method)
    m.apply(model, make_cfg(method, "bert", **params))
    trained, total = m.count_trainable(model)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    if method == "sparse":
        expected = head + sum(
            round(0.01 * p.numel()) for n, p in model.named_parameters() if not n.startswith("classifier.")
        )
        assert trained == expected
    else:
        assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert head <= trained < total


# ---------------------------------------------------------------------------- end to end through peft_magic.train


@pytest.fixture(scope="module")
def biased_llama(tmp_path_factory):
    """conftest's tiny Llama with attention and MLP biases, so that bitfit has something to train (and
    initializer_range 0.1, see `base_dirs`)."""
    from conftest import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False, attention_bias=True, mlp_bias=True, initializer_range=0.1)  # fmt: skip
    path = tmp_path_factory.mktemp("biased-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


E2E = [
    ("bitfit", {}, 3e-2, lambda n: n.endswith(".bias")),
    ("layers", {"last_n": 1}, 3e-3, lambda n: n.startswith("model.layers.1.")),
    ("head-only", {}, 1e-2, lambda n: n == "lm_head.weight"),
    ("sparse", {"density": 0.02, "l2sp": 0.01}, 1e-2, None),
]


@pytest.mark.parametrize("method,params,lr,claims", E2E, ids=[c[0] for c in E2E])
def test_trains_exports_and_reloads_through_the_engine(biased_llama, tmp_path, method, params, lr, claims):
    from conftest import lm_rows

    import peft_magic

    cfg = {
        "model": biased_llama,
        "method": {"name": method, **params},
        "data": {"train": lm_rows(), "eval": 0.2},
        "train": {"max_steps": 30, "learning_rate": lr, "logging_steps": 10, "eval_steps": 0,
                  "output_dir": str(tmp_path / "out")},
    }  # fmt: skip
    run = peft_magic.train(cfg, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < 0.9 * losses[0], losses

    base = dict(LlamaForCausalLM.from_pretrained(biased_llama).named_parameters())
    state = get_state(run.model)
    for name, p in run.model.named_parameters():
        moved = (p.detach() != base[name]).reshape(-1)
        if claims is not None:
            assert claims(name) or not moved.any(), name
        else:
            allowed = torch.zeros_like(moved)
            allowed[state.sparse.get(name, torch.tensor([], dtype=torch.long))] = True
            assert not (moved & ~allowed).any(), name

    enc = run.tokenizer(["the cat sat on the mat"], return_tensors="pt")
    with torch.no_grad():
        expected = run.model.eval()(**enc).logits
        loaded = peft_magic.load(run.export(tmp_path / "delta"))
        assert (loaded.model(**enc).logits - expected).abs().max() <= 1e-6
        merged = LlamaForCausalLM.from_pretrained(run.export(tmp_path / "merged", merge=True))
        assert (merged(**enc).logits - expected).abs().max() <= 1e-6
    assert get_state(run.model) is not None  # the merged export left the run's model as it was


# ---------------------------------------------------------------------------- continued fine-tuning (from: DIR)


@pytest.mark.parametrize("method,params", [("bitfit", {}), ("sparse", {"density": 0.05, "criterion": "random"})])
def test_from_continues_where_the_export_left_off(base_dirs, tmp_path, method, params):
    m, first, cfg, batches = prepared(base_dirs, method, "llama", **params)
    train(first, m, batches, steps=2)
    m.save(first, tmp_path / "one", cfg)

    cfg2 = _reseeded(make_cfg(method, **params, **{"from": str(tmp_path / "one")}))  # sparse: another random draw
    second = m.apply(load_base(base_dirs, "llama"), cfg2, calibration=lambda: iter(batches))
    assert torch.equal(logits(second, batches), logits(first, batches))  # starts from the exported state
    if method == "sparse":
        assert all(torch.equal(get_state(second).sparse[n], i) for n, i in get_state(first).sparse.items())
    before = snapshot(second)
    train(second, m, batches, steps=2)
    assert changed(before, second)
    m.save(second, tmp_path / "two", cfg2)
    again = m.load(load_base(base_dirs, "llama"), tmp_path / "two")
    assert torch.equal(logits(again, batches), logits(second, batches))


def test_from_refuses_a_delta_this_run_would_not_export(base_dirs, tmp_path):
    m, model, cfg, _ = prepared(base_dirs, "layers", "llama", last_n=1)
    m.save(model, tmp_path, cfg)
    with pytest.raises(ConfigError) as err:
        m.apply(load_base(base_dirs, "llama"), make_cfg("layers", layers=[0], **{"from": str(tmp_path)}))
    assert err.value.key == "method.from" and "model.layers.1." in str(err.value)
    with pytest.raises(ConfigError, match="exported by layers") as err:
        make_cfg("bitfit", **{"from": str(tmp_path)})
    assert err.value.key == "method.from"
    with pytest.raises(ConfigError) as err:
        make_cfg("sparse", **{"from": str(tmp_path / "nowhere")})
    assert err.value.key == "method.from"


def test_fresh_heads_are_found_generically():
    from transformers import BertForTokenClassification, DistilBertConfig, DistilBertForSequenceClassification

    from peft_magic.methods.selective import fresh_head_names, head_names

    with torch.device("meta"):
        tok_cls = BertForTokenClassification(BertConfig(**BERT, num_labels=5))
        distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                                                      hidden_dim=64))  # fmt: skip
        llama = LlamaForCausalLM(LlamaConfig(**LLAMA))
    assert fresh_head_names(tok_cls, "token-cls") == ["classifier.weight", "classifier.bias"]
    assert set(fresh_head_names(distil, "seq-cls")) == {"pre_classifier.weight", "pre_classifier.bias",
                                                         "classifier.weight", "classifier.bias"}  # fmt: skip
    assert fresh_head_names(llama, "causal-lm") == [] and head_names(llama, "causal-lm") == ["lm_head.weight"]


def test_seq_cls_head_trains_and_reloads_through_the_engine(tiny_bert, tmp_path):
    from conftest import sentiment_rows

    import peft_magic

    cfg = {
        "model": tiny_bert,
        "task": "seq-cls",
        "method": {"name": "layers", "last_n": 2},
        "data": {"train": sentiment_rows(64), "eval": sentiment_rows(16, seed=1)},
        # at 3e-3 the loss stayed at ln 2 (0.696 -> 0.6964 on seed 0): whether it fell was the dropout's draw
        "train": {"max_steps": 30, "learning_rate": 1e-2, "logging_steps": 10, "eval_steps": 0,
                  "output_dir": str(tmp_path / "out")},
    }  # fmt: skip
    run = peft_magic.train(cfg, display="none")
    losses = [r["loss"] for r in run.history if "loss" in r]
    assert losses[-1] < losses[0], losses
    assert "classifier.weight" in get_state(run.model).dense
    loaded = peft_magic.load(run.export(tmp_path / "delta"))
    assert loaded.labels == ["neg", "pos"]
    enc = run.tokenizer(["the movie was good", "the plot was dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (loaded.model(**enc).logits - run.model.eval()(**enc).logits).abs().max() <= 1e-6
