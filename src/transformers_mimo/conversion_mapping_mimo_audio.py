"""
The original checkpoint format of both models, and how it maps to this package's: written once, read by the on-load
translation (`MiMoAudioConfig.get_config_dict`, the key mapping registered for `MiMoAudioForConditionalGeneration`,
`MiMoAudioTokenizerModel.from_pretrained`) and by the conversion scripts (`convert_mimo_audio_to_hf`,
`convert_mimo_audio_tokenizer_to_hf`). It imports nothing from this package.

- Language model (`XiaomiMiMo/MiMo-Audio-7B-*`, `XiaomiMiMo/MiMo-V2.5-ASR`): `ORIGINAL_CHECKPOINT_KEY_MAPPING`
  (tensor names), `ORIGINAL_DROPPED_KEY_PATTERN` (non-persistent buffers some checkpoints carry),
  `convert_original_config_dict` (the flat Qwen2-style config -> `MiMoAudioConfig` arguments) and the special tokens
  (`SPECIAL_TOKENS`, read from the tokenizer files by `read_special_token_ids`).
- Audio tokenizer (`XiaomiMiMo/MiMo-Audio-Tokenizer`): `ORIGINAL_TOKENIZER_KEY_MAPPING` and the tensors it does not
  load, `ORIGINAL_TOKENIZER_IGNORED_KEYS` (the ISTFT window among them, checked by `check_original_istft_window`).

docs/conversion.md has the tables in prose.
"""

import json
import os
import re

import torch
from transformers.utils import cached_file, logging


logger = logging.get_logger(__name__)

# `from_pretrained` arguments that locate a checkpoint's files (to look at them before deciding it is an original one).
HUB_KWARGS = ("cache_dir", "local_files_only", "proxies", "revision", "subfolder", "token")

# ------------------------------------------------------------------------------------------------- special tokens

# Tokens the original adds to the text tokenizer when they are missing, in its order (processor attribute name ->
# token; the processor exposes each id as `<name>_id`).
SPECIAL_TOKENS = {
    "sosp_token": "<|sosp|>",  # start of an input speech segment
    "eosp_token": "<|eosp|>",  # end of an input speech segment
    "empty_token": "<|empty|>",  # text channel of an audio patch
    "human_token": "<|Human|>",
    "speechlm_token": "<|SpeechLM|>",
    "sostm_token": "<|sostm|>",  # start of the assistant speech stream
    "eostm_token": "<|eostm|>",  # end of the assistant speech stream
    "eot_token": "<|eot|>",  # end of the text inside the speech stream
}
# Chat tokens of the Qwen2 tokenizer that MiMo-Audio prompts use.
CHAT_TOKENS = {"im_start_token": "<|im_start|>", "im_end_token": "<|im_end|>"}
# `MiMoAudioConfig` field -> token.
SPECIAL_TOKEN_ID_FIELDS = {
    f"{name}_id": token
    for name, token in {**SPECIAL_TOKENS, **CHAT_TOKENS}.items()
    if name not in ("human_token", "speechlm_token")
}

# ----------------------------------------------------------------------------------------- language model: tensors

# Original checkpoint key (regex) -> key of `MiMoAudioForConditionalGeneration` (first matching rule wins). No source
# key matches two rules. Loading applies the rules in this order and saving with `save_original_format=True` reverts
# them in the opposite order, so a rule whose target prefixes another's (`patch_decoder.`) comes before that one.
ORIGINAL_CHECKPOINT_KEY_MAPPING = {
    r"^model\.(?!language_model\.|audio_embeddings\.|patch_encoder\.)": "model.language_model.",
    r"^local_transformer\.": "patch_decoder.",
    r"^speech_embeddings\.": "model.audio_embeddings.",
    r"^input_local_transformer\.": "model.patch_encoder.",
    r"^speech_group_downcast\.": "model.patch_encoder.proj.",
    r"^hidden_states_downcast\.": "patch_decoder.input_proj.",
    r"^speech_embeddings_to_local\.": "patch_decoder.embeddings_proj.",
    r"^local_transformer_lm_heads\.": "patch_decoder.heads.",
}
# Non-persistent buffers that some original checkpoints carry; the model recomputes them from the config.
ORIGINAL_DROPPED_KEY_PATTERN = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def rename_original_key(key: str) -> str:
    """Original checkpoint key -> key of `MiMoAudioForConditionalGeneration` (first matching rule; else unchanged)."""
    for pattern, replacement in ORIGINAL_CHECKPOINT_KEY_MAPPING.items():
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return key


# ------------------------------------------------------------------------------------------ audio tokenizer: tensors

# Original MiMo-Audio-Tokenizer key (regex) -> ours. Everything else keeps its original name.
ORIGINAL_TOKENIZER_KEY_MAPPING = {
    r"^encoder\.quantizer\.vq\.layers\.(\d+)\._codebook\.embed$": r"quantizer.layers.\1.embed",
    r"^encoder\.down_sample_layer\.0\.weight$": r"encoder.down_sample_layer.weight",
}
ORIGINAL_TOKENIZER_WINDOW_KEY = "decoder.vocoder.head.istft.window"
# Original tensors the codec does not load: the codebooks' EMA training state (`cluster_size`, `embed_avg`, `inited`)
# is unused at inference, and the ISTFT window is a periodic Hann window that the model rebuilds in float32.
ORIGINAL_TOKENIZER_IGNORED_KEYS = (
    r"^encoder\.quantizer\.vq\.layers\.\d+\._codebook\.(cluster_size|embed_avg|inited)$",
    rf"^{re.escape(ORIGINAL_TOKENIZER_WINDOW_KEY)}$",
)


def rename_original_tokenizer_key(key: str) -> str:
    """Original MiMo-Audio-Tokenizer key -> key of `MiMoAudioTokenizerModel` (unchanged where no rule matches)."""
    for pattern, replacement in ORIGINAL_TOKENIZER_KEY_MAPPING.items():
        key = re.sub(pattern, replacement, key)
    return key


def is_original_tokenizer_key(key: str) -> bool:
    """Whether `key` exists only in the original codec layout (a key that `ORIGINAL_TOKENIZER_KEY_MAPPING` renames)."""
    return any(re.match(pattern, key) for pattern in ORIGINAL_TOKENIZER_KEY_MAPPING)


def is_ignored_original_tokenizer_key(key: str) -> bool:
    """Whether `key` is an original codec tensor that is deliberately not loaded: `ORIGINAL_TOKENIZER_IGNORED_KEYS`."""
    return any(re.match(pattern, key) for pattern in ORIGINAL_TOKENIZER_IGNORED_KEYS)


def check_original_istft_window(window: torch.Tensor, nfft: int) -> None:
    """Raises `ValueError` unless `window` is the periodic Hann window of length `nfft` that the codec rebuilds."""
    hann = torch.hann_window(nfft, dtype=torch.float32)
    # atol covers bf16 checkpoints, which store the window rounded to bf16.
    if window.shape != hann.shape or not torch.allclose(window.float().cpu(), hann, atol=4e-3):
        raise ValueError(f"`{ORIGINAL_TOKENIZER_WINDOW_KEY}` is not a periodic Hann window of length {nfft}.")


# ------------------------------------------------------------------------------------------ language model: config

# `config.json` architecture of Xiaomi's MiMo-V2.5-ASR release (a MiMo-Audio model trained for speech recognition).
V25_ASR_ARCHITECTURE = "MiMoV2ASRForCausalLM"


def is_original_config_dict(config_dict: dict) -> bool:
    """Whether `config_dict` is the flat Qwen2-style config of an original MiMo-Audio checkpoint."""
    return config_dict.get("model_type") != "mimo_audio" and "speech_vocab_size" in config_dict


def _parse_per_channel(value, channels: int, name: str) -> list[int]:
    """Parses the original's `"a-b-c"` strings (or one number meaning the same value for every channel)."""
    if isinstance(value, str):
        values = [int(item) for item in value.split("-")] if "-" in value else [int(value)] * channels
    elif isinstance(value, int):
        values = [value] * channels
    elif isinstance(value, list):
        values = [int(item) for item in value]
    else:
        raise ValueError(f"Cannot parse `{name}`={value!r} of the original config.")
    if len(values) != channels:
        raise ValueError(f"Original `{name}`={value!r} has {len(values)} entries but `audio_channels` is {channels}.")
    return values


# Keys of the original flat config that describe the Qwen2 backbone.
_ORIGINAL_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# Keys shared by the backbone and both patch transformers (the original deep-copies its whole config for them).
_INHERITED_KEYS = (
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
)


def convert_original_config_dict(config_dict: dict, special_token_ids: dict[str, int] | None = None) -> dict:
    """
    Translates the flat config of an original MiMo-Audio checkpoint (`model_type: "qwen2"`, dash-separated strings,
    `local_*` / `input_local_*` fields) into the keyword arguments of [`MiMoAudioConfig`].

    The patch transformers follow the original: the patch decoder has `local_attn_heads` query and key/value heads,
    head dim `local_dim // local_attn_heads` and FFN `local_ffn_dim`; the patch encoder has width `input_local_dim`
    (`local_dim` when unset), the same head count, and FFN `4 * input_local_dim`. Both inherit RoPE, norm epsilon and
    maximum length from the backbone; `local_attn_dropout` is their attention dropout. `input_full_attention: null`
    means causal, as in the original. `head_dim` defaults to 128, the original's default.
    """
    channels = int(config_dict.get("audio_channels", 8))
    text_config = {key: config_dict[key] for key in _ORIGINAL_TEXT_KEYS if key in config_dict}
    text_config["head_dim"] = config_dict.get("head_dim") or 128
    text_config["model_type"] = "qwen2"
    inherited = {key: config_dict[key] for key in _INHERITED_KEYS if config_dict.get(key) is not None}

    local_dim = int(config_dict.get("local_dim", 1024))
    heads = int(config_dict.get("local_attn_heads", 64))
    dropout = config_dict.get("local_attn_dropout", 0.1)
    encoder_dim = int(config_dict.get("input_local_dim") or local_dim)

    def patch_config(width: int, layers: int, intermediate_size: int) -> dict:
        return {
            **inherited,
            "hidden_size": width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": width // heads,
            "intermediate_size": intermediate_size,
            "attention_dropout": dropout,
        }

    patch_decoder_config = patch_config(
        local_dim, int(config_dict.get("local_layers", 16)), int(config_dict.get("local_ffn_dim", 4096))
    )
    patch_encoder_config = patch_config(encoder_dim, int(config_dict.get("input_local_layers", 6)), 4 * encoder_dim)
    converted = {
        "model_type": "mimo_audio",
        "architectures": ["MiMoAudioForConditionalGeneration"],
        "text_config": text_config,
        "patch_encoder_config": patch_encoder_config,
        "patch_decoder_config": patch_decoder_config,
        "group_size": int(config_dict.get("group_size", 4)),
        "audio_channels": channels,
        "audio_vocab_sizes": _parse_per_channel(
            config_dict.get("speech_vocab_size", "1025-1025-129-129-129-129-129-129"), channels, "speech_vocab_size"
        ),
        "audio_empty_ids": _parse_per_channel(
            config_dict.get("speech_zeroemb_idx", "1024-1024-128-128-128-128-128-128"), channels, "speech_zeroemb_idx"
        ),
        "delay_pattern": _parse_per_channel(
            config_dict.get("delay_pattern", "0-1-2-3-4-5-6-7"), channels, "delay_pattern"
        ),
        "input_full_attention": bool(config_dict.get("input_full_attention")),
        "tie_word_embeddings": bool(config_dict.get("tie_word_embeddings", False)),
    }
    for key in ("torch_dtype", "dtype", "transformers_version"):
        if key in config_dict:
            converted[key] = config_dict[key]
    if "empty_loss_weight" in config_dict:
        converted["empty_token_loss_weight"] = float(config_dict["empty_loss_weight"])
    if config_dict.get("layer_types") is not None:
        text_config["layer_types"] = _checked_layer_types(config_dict)
    if V25_ASR_ARCHITECTURE in (config_dict.get("architectures") or []):
        converted["model_variant"] = "mimo-v2.5-asr"
    extra = {key: value for key, value in config_dict.items() if key not in _READ_ORIGINAL_KEYS}
    if extra.get("audio_config") is not None:
        extra["audio_config"] = _unrepeated_audio_config(config_dict)
        if not extra["audio_config"]:
            del extra["audio_config"]
    _check_repeated_training_keys(config_dict)
    if extra:
        converted["original_extra_config"] = extra
    converted.update(special_token_ids or {})
    return converted


# Keys of the original flat config that the translation above reads (everything else is kept in
# `original_extra_config`).
_READ_ORIGINAL_KEYS = frozenset(
    (
        *_ORIGINAL_TEXT_KEYS,
        "model_type",
        "architectures",
        "head_dim",
        "layer_types",
        "local_dim",
        "local_layers",
        "local_attn_heads",
        "local_ffn_dim",
        "local_attn_dropout",
        "input_local_dim",
        "input_local_layers",
        "input_full_attention",
        "group_size",
        "audio_channels",
        "speech_vocab_size",
        "speech_zeroemb_idx",
        "delay_pattern",
        "empty_loss_weight",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_name_or_path",
    )
)


def _original_value(config_dict: dict, key: str, default=None):
    value = config_dict.get(key)
    return default if value is None else value


def _repeated_audio_config_values(config_dict: dict) -> dict:
    """
    Values the V2.5-ASR release's nested `audio_config` repeats from the flat config the original code reads (which
    never reads `audio_config`): nested key -> (the value the model is built with, where it comes from).
    """
    channels = int(_original_value(config_dict, "audio_channels", 8))
    heads = int(_original_value(config_dict, "local_attn_heads", 64))
    encoder_dim = int(config_dict.get("input_local_dim") or _original_value(config_dict, "local_dim", 1024))
    per_channel = {
        key: (_parse_per_channel(config_dict[key], channels, key), key)
        for key in ("speech_vocab_size", "speech_zeroemb_idx")
        if key in config_dict
    }
    values = {
        "audio_channels": (channels, "audio_channels"),
        "group_size": (int(_original_value(config_dict, "group_size", 4)), "group_size"),
        "input_full_attention": (bool(config_dict.get("input_full_attention")), "input_full_attention"),
        "input_local_attn_heads": (heads, "local_attn_heads"),
        "input_local_dim": (encoder_dim, "input_local_dim (or local_dim)"),
        "input_local_head_dim": (encoder_dim // heads, "input_local_dim // local_attn_heads"),
        "input_local_intermediate_size": (4 * encoder_dim, "4 * input_local_dim"),
        "input_local_layers": (int(_original_value(config_dict, "input_local_layers", 6)), "input_local_layers"),
        "out_hidden_size": (config_dict.get("hidden_size"), "hidden_size"),
        "rope_theta": (config_dict.get("rope_theta"), "rope_theta"),
        "input_local_hidden_dropout": (config_dict.get("local_hidden_dropout"), "local_hidden_dropout"),
        **per_channel,
    }
    return {key: value for key, value in values.items() if value[0] is not None}


def _same(nested, expected, key: str, channels: int) -> bool:
    if key in ("speech_vocab_size", "speech_zeroemb_idx"):
        return _parse_per_channel(nested, channels, f"audio_config.{key}") == expected
    if isinstance(expected, bool):
        return bool(nested) == expected
    if isinstance(expected, (int, float)) and isinstance(nested, (int, float)) and not isinstance(nested, bool):
        return float(nested) == float(expected)
    return nested == expected


def _unrepeated_audio_config(config_dict: dict) -> dict:
    """
    Checks the values the nested `audio_config` repeats against the flat config (a contradiction is an error, since
    the original silently uses the flat value) and returns the nested keys that repeat nothing.
    """
    nested = config_dict["audio_config"]
    if not isinstance(nested, dict):
        raise ValueError(f"The original config's `audio_config` must be a dict, got {type(nested).__name__}.")
    repeated = _repeated_audio_config_values(config_dict)
    channels = int(_original_value(config_dict, "audio_channels", 8))
    for key, (expected, source) in repeated.items():
        if key in nested and not _same(nested[key], expected, key, channels):
            raise ValueError(
                f"The original config contradicts itself: `audio_config.{key}`={nested[key]!r} but the model is built "
                f"with {expected!r} (from `{source}`). Fix one of them in config.json."
            )
    return {key: value for key, value in nested.items() if key not in repeated}


def _check_repeated_training_keys(config_dict: dict):
    """Top-level keys the original never reads but that restate a value it does read must agree with it."""
    rope_theta = config_dict.get("rope_theta")
    local_base = config_dict.get("local_rotary_base")
    if local_base is not None and rope_theta is not None and float(local_base) != float(rope_theta):
        raise ValueError(
            f"The original config contradicts itself: `local_rotary_base`={local_base!r} but the patch transformers "
            f"use the backbone's `rope_theta`={rope_theta!r} (as the original code does). Fix one of them in "
            "config.json."
        )
    channels = int(_original_value(config_dict, "audio_channels", 8))
    n_rvq = config_dict.get("n_rvq")
    if n_rvq is not None and int(n_rvq) < channels:
        raise ValueError(
            f"The original config contradicts itself: `n_rvq`={n_rvq!r} codebooks but `audio_channels`={channels}."
        )


def _checked_layer_types(config_dict: dict) -> list[str]:
    """The transformers-4.57 `layer_types` list, checked against the layer count and the sliding-window switch."""
    layer_types = list(config_dict["layer_types"])
    layers = config_dict.get("num_hidden_layers")
    if layers is not None and len(layer_types) != int(layers):
        raise ValueError(
            f"The original config contradicts itself: `layer_types` has {len(layer_types)} entries but "
            f"`num_hidden_layers` is {layers}."
        )
    if not config_dict.get("use_sliding_window") and set(layer_types) - {"full_attention"}:
        raise ValueError(
            f"The original config contradicts itself: `layer_types`={layer_types} but `use_sliding_window` is off."
        )
    return layer_types


def special_token_ids_from_vocab(token_to_id: dict[str, int]) -> dict[str, int]:
    """Picks the config's special token ids (`empty_token_id`, ...) out of a token -> id mapping."""
    return {field: token_to_id[token] for field, token in SPECIAL_TOKEN_ID_FIELDS.items() if token in token_to_id}


def read_special_token_ids(pretrained_model_name_or_path, **kwargs) -> dict[str, int]:
    """
    Reads the ids of MiMo-Audio's special tokens from the text tokenizer files of a checkpoint (`tokenizer.json`,
    `added_tokens.json`, `tokenizer_config.json`). Tokens that are not found keep the config defaults (the released
    model's ids).
    """
    token_to_id: dict[str, int] = {}
    lookup = {
        key: kwargs[key]
        for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
        if kwargs.get(key) is not None
    }

    def resolve(filename):
        if os.path.isdir(pretrained_model_name_or_path):
            path = os.path.join(pretrained_model_name_or_path, lookup.get("subfolder", ""), filename)
            return path if os.path.isfile(path) else None
        return cached_file(
            pretrained_model_name_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **lookup,
        )

    if path := resolve("tokenizer.json"):
        with open(path, encoding="utf-8") as handle:
            token_to_id.update({entry["content"]: entry["id"] for entry in json.load(handle).get("added_tokens", [])})
    if path := resolve("added_tokens.json"):
        with open(path, encoding="utf-8") as handle:
            token_to_id.update(json.load(handle))
    if path := resolve("tokenizer_config.json"):
        with open(path, encoding="utf-8") as handle:
            decoder = json.load(handle).get("added_tokens_decoder", {})
        token_to_id.update({entry["content"]: int(index) for index, entry in decoder.items()})
    found = special_token_ids_from_vocab(token_to_id)
    missing = sorted(set(SPECIAL_TOKEN_ID_FIELDS) - set(found))
    if missing:
        logger.info(f"Special tokens not found in the tokenizer files, using the released model's ids for {missing}.")
    return found


__all__ = [
    "CHAT_TOKENS",
    "ORIGINAL_CHECKPOINT_KEY_MAPPING",
    "ORIGINAL_TOKENIZER_IGNORED_KEYS",
    "ORIGINAL_TOKENIZER_KEY_MAPPING",
    "SPECIAL_TOKENS",
    "V25_ASR_ARCHITECTURE",
    "convert_original_config_dict",
    "is_original_config_dict",
    "read_special_token_ids",
    "rename_original_key",
    "rename_original_tokenizer_key",
    "special_token_ids_from_vocab",
]
