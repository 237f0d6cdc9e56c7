"""What quantization leaves alone, and two workarounds for bitsandbytes' packed 4-bit CPU kernel.

Only the LLM's linear layers are quantized (measurements in docs/quantization.md). bitsandbytes (0.50) repacks each
4-bit weight for its AVX512-BF16 CPU kernel at the first CPU inference; the model calls
`keep_bnb_cpu_4bit_layers_unpacked` after loading (layers that kernel cannot take stay on the generic path) and
`unpack_bnb_cpu_4bit_weights` before saving (so the saved checkpoint reloads as the same model). Both touch only
4-bit layers and do nothing on other models.
"""

import torch
from torch import nn


# Modules that quantization leaves in full precision (the model's `_keep_in_fp32_modules`): the codebook embeddings,
# the patch encoder and the whole patch decoder (its input projection, transformer and per-codebook heads).
# `lm_head` stays unquantized through Transformers' default. A custom `llm_int8_skip_modules` replaces those
# defaults: pass `QUANTIZATION_SKIP_MODULES` plus your own names to keep the same split.
UNQUANTIZED_MODULES = ("model.audio_embeddings", "model.patch_encoder", "patch_decoder")
QUANTIZATION_SKIP_MODULES = ("lm_head", *UNQUANTIZED_MODULES)


def keep_bnb_cpu_4bit_layers_unpacked(model: nn.Module) -> list[str]:
    """
    bitsandbytes (0.50) repacks a 4-bit weight `(N, K)` for its AVX512-BF16 CPU kernel at the first CPU inference,
    which needs `N` divisible by 32 and `K` by the quantization block size; other layers (e.g. an 80-wide or
    16-wide projection) fail there with an assertion or a reshape error. Those layers of `model` keep bitsandbytes'
    generic (unpacked) 4-bit path instead; returns their names.
    """
    unpacked = []
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        out_features, in_features = state.shape
        if out_features % 32 or in_features % 2 or in_features % state.blocksize:
            module.support_avx512bf16_for_cpu = False
            unpacked.append(name)
    return unpacked


def unpack_bnb_cpu_4bit_weights(model: nn.Module) -> None:
    """
    Undoes bitsandbytes' CPU repacking of the 4-bit weights of `model` in place, before saving. The repacking makes
    the block scales bf16 (dequantized first under double quantization) and stores them transposed; bitsandbytes' own
    unpacking on save leaves them transposed (the checkpoint then reloads as another model) or re-quantizes them (a
    slightly different model). Here they are unpacked with the bf16 scales in their original layout, as plain float32
    scales: the saved model computes exactly what the repacked one did (without double quantization of the scales,
    which cost 0.5 instead of 0.13 bits per weight). Uses bitsandbytes' private
    `_convert_weight_packed_for_cpu_inverse` (imported only when a repacked weight is found, so bitsandbytes stays
    optional).
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        state.original_nested = False  # keep the scales the repacked model used, instead of re-quantizing them
        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32)  # (N * K / blocksize,), quantization's order
        weight.quant_state = state


__all__ = [
    "QUANTIZATION_SKIP_MODULES",
    "UNQUANTIZED_MODULES",
    "keep_bnb_cpu_4bit_layers_unpacked",
    "unpack_bnb_cpu_4bit_weights",
]
