"""The LoRA adapter as a GGUF adapter file (`general.type = adapter`), which llama.cpp (`--lora`),
llama-cpp-python (`lora_path`) and Ollama (`ADAPTER`) apply to the base model's GGUF file.

Each adapted weight W gets two tensors, `<name>.lora_a` (r x in) and `<name>.lora_b` (out x r), in llama.cpp's
tensor names; llama.cpp adds `alpha / r * B @ A` at run time. Query/key B matrices are row-permuted exactly like
the merged weights (the delta's output rows must line up with the base rows they are added to); A matrices act on
the input side and keep their layout.
"""

from __future__ import annotations

from ..errors import ConfigError
from . import arch as archs
from .files import Planned, write_gguf

SUGGEST_MERGED = "Fix: export a merged GGUF instead (--gguf q8_0), which works for every method."


def lora_config_of(model):
    """The active peft config of a PeftModel (None for anything else)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    return configs.get(getattr(model, "active_adapter", None) or "default") or next(iter(configs.values()))


def adapter_problem(peft_config) -> str | None:
    """Why this adapter cannot be a llama.cpp LoRA file, or None when it can."""
    kind = str(getattr(peft_config, "peft_type", "none")).split(".")[-1].lower()
    if kind != "lora":
        return f"a GGUF adapter holds LoRA matrices, and this run's method is {kind.replace('_', '-')}"
    if getattr(peft_config, "use_dora", False):
        return "DoRA's magnitude vectors have no place in a llama.cpp LoRA file"
    if getattr(peft_config, "modules_to_save", None):
        return f"the run also trains whole modules ({', '.join(peft_config.modules_to_save)}), which a LoRA file cannot carry"
    if getattr(peft_config, "lora_bias", False):
        return "LoRA biases (lora_bias) have no place in a llama.cpp LoRA file"
    return None


def check_adapter(model) -> archs.Arch:
    """Refuse, in one line and before writing, what llama.cpp cannot apply as an adapter."""
    config = lora_config_of(model)
    problem = "the run has no peft adapter" if config is None else adapter_problem(config)
    if problem:
        raise ConfigError(f"cannot write a GGUF LoRA adapter: {problem}. {SUGGEST_MERGED}", key="gguf_adapter")
    return archs.arch_for(model.config)


def lora_layers(model):
    """(module name, A weight, B weight, scale) of every LoRA layer of the active adapter."""
    from peft.tuners.lora import LoraLayer

    adapter = getattr(model, "active_adapter", None) or "default"
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise ConfigError(f"cannot write a GGUF LoRA adapter: '{name}' is an embedding LoRA. {SUGGEST_MERGED}",
                              key="gguf_adapter")  # fmt: skip
        yield name, module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])


def plan_adapter(model, arch: archs.Arch, alpha: float, dtype: str = "F32") -> list[Planned]:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    names = archs.NameMap(config, arch)
    planned = []
    for module_name, a, b, scale in lora_layers(model):
        target = names(module_name + ".weight")
        if target is None:
            raise ConfigError(f"cannot write a GGUF LoRA adapter: llama.cpp has no tensor for '{module_name}'. "
                              f"{SUGGEST_MERGED}", key="gguf_adapter")  # fmt: skip
        rank = a.shape[0]
        # llama.cpp scales by alpha / rank; fold whatever peft does beyond that (rsLoRA, per-module patterns) into B
        fold = scale * rank / alpha
        perm = archs.qk_permutation(module_name + ".weight", config, arch)
        planned.append(Planned(target + ".lora_a", tuple(a.shape), dtype, _make(a)))
        planned.append(Planned(target + ".lora_b", tuple(b.shape), dtype, _make(b, fold, perm)))
    if not planned:
        raise ConfigError("cannot write a GGUF LoRA adapter: the run's adapter has no LoRA layers. "
                          f"{SUGGEST_MERGED}", key="gguf_adapter")  # fmt: skip
    return planned


def _make(weight, fold: float = 1.0, perm=None):
    def make():
        data = weight.detach().to("cpu").float().numpy()
        if fold != 1.0:
            data = data * fold
        return archs.permute_rows(data, *perm) if perm else data

    return make


def write_lora_gguf(model, path: str, name: str | None = None, dtype: str = "F32", progress=None) -> str:
    """Write the active LoRA adapter of the PeftModel `model` to the GGUF adapter file `path` (atomically).

    Args:
        model: A PeftModel with a LoRA adapter on a supported architecture.
        path: The `.gguf` file.
        name: `general.name`.
        dtype: `F32` (exact) or `F16` (half the size).
        progress: `progress(done, total, tensor_name)`.
    """
    import gguf

    arch = check_adapter(model)
    alpha = float(lora_config_of(model).lora_alpha) or 1.0

    def setup(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if name:
            writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType["ALL_F32" if dtype == "F32" else "MOSTLY_F16"]))

    return write_gguf(path, setup, plan_adapter(model, arch, alpha, dtype), archs.arch_name(arch), progress)


def base_state_dict(model):
    """The base weights of a PeftModel without its LoRA tensors, under the base model's own names (to write the
    base GGUF an adapter applies to, when the run did not start from one)."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out
