"""LoRA under autocast without peft's round trip through float32.

peft's `lora.Linear.forward` casts its input to the adapter's dtype (float32) before the dropout and A. Under
bf16/fp16 autocast an input that is already 16-bit (the attention output into `o_proj`, the MLP product into
`down_proj`) is thus copied to float32, dropped out in float32, and copied back to 16 bits by autocast for A's
matmul, and the same again for the gradient. Without the cast A receives the very same 16-bit values (scaling a
16-bit value in float32 and rounding gives what the 16-bit multiply gives), so the result is identical and two
copies of the layer's input (and two of its gradient) are saved per adapted layer: ~10% of the CPU time of a
SmolLM2 training step under bf16 autocast, measured.

Only for a run under mixed precision (everything runs under autocast) and vanilla LoRA layers (variants such as
DoRA compute more from the input); the returned function restores peft's cast, so evaluation and generation
after the run, outside autocast, see peft's own behaviour.
"""

from __future__ import annotations


def skip_input_casts(model, mixed_precision: str):
    """Turn off peft's input cast on `model`'s vanilla LoRA layers for a run under `mixed_precision` ("bf16" or
    "fp16"); returns a function that turns it back on (a no-op for other precisions)."""
    if mixed_precision not in ("bf16", "fp16"):
        return lambda: None
    from peft.tuners.lora import LoraLayer

    changed = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module, "lora_variant", None):
            changed.append((module, module.__dict__.get("cast_input_dtype_enabled", None)))
            module.cast_input_dtype_enabled = False

    def release():
        for module, before in changed:
            if before is None:
                del module.cast_input_dtype_enabled
            else:
                module.cast_input_dtype_enabled = before

    return release
