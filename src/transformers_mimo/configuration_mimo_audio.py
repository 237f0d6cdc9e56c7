"""MiMo-Audio language model configuration."""

import json
import os
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.utils import cached_file, logging


logger = logging.get_logger(__name__)

# Sizes of the released MiMo-Audio-7B backbone (Qwen2 layout).
_DEFAULT_TEXT_CONFIG = {
    "vocab_size": 151680,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 640000.0,
    "tie_word_embeddings": False,
}

# Ids of the special tokens in the released MiMo-Audio text tokenizer.
DEFAULT_SPECIAL_TOKEN_IDS = {
    "empty_token_id": 151667,
    "sosp_token_id": 151665,
    "eosp_token_id": 151666,
    "sostm_token_id": 151670,
    "eostm_token_id": 151671,
    "eot_token_id": 151672,
    "im_start_token_id": 151644,
    "im_end_token_id": 151645,
}

# Config field -> token text.
SPECIAL_TOKENS = {
    "empty_token_id": "<|empty|>",
    "sosp_token_id": "<|sosp|>",
    "eosp_token_id": "<|eosp|>",
    "sostm_token_id": "<|sostm|>",
    "eostm_token_id": "<|eostm|>",
    "eot_token_id": "<|eot|>",
    "im_start_token_id": "<|im_start|>",
    "im_end_token_id": "<|im_end|>",
}

# `config.json` architecture of Xiaomi's MiMo-V2.5-ASR release (a MiMo-Audio model trained for speech recognition).
V25_ASR_ARCHITECTURE = "MiMoV2ASRForCausalLM"
# `MiMoAudioConfig.model_variant`: which release a checkpoint comes from. It decides the processor's audio recipe and
# ASR prompt and the generation defaults written by the conversion.
MODEL_VARIANTS = ("mimo-audio", "mimo-v2.5-asr")

# Loss weights of the official training recipe for 8 codebooks (text weight 100, sum 136).
_DEFAULT_AUDIO_LOSS_WEIGHTS = [12.0, 8.0, 6.0, 4.0, 2.0, 2.0, 1.0, 1.0]


@strict
class MiMoAudioPatchEncoderConfig(Qwen2Config):
    r"""
    Configuration of the MiMo-Audio patch encoder: a stack of Qwen2 decoder layers (no embedding table) that mixes
    the `group_size` frames of one audio patch. Whether it attends bidirectionally inside a patch is set by
    [`MiMoAudioConfig.input_full_attention`].
    """

    model_type = "mimo_audio_patch_encoder"
    base_config_key = "patch_encoder_config"
    default_theta = 640000.0

    vocab_size: int = 0
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 6
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 64
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    attention_dropout: float | int = 0.1

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)


@strict
class MiMoAudioPatchDecoderConfig(Qwen2Config):
    r"""
    Configuration of the MiMo-Audio patch decoder: a causal stack of Qwen2 decoder layers (no embedding table) that
    produces the codes of one audio patch from a backbone hidden state, with one output head per codebook.
    """

    model_type = "mimo_audio_patch_decoder"
    base_config_key = "patch_decoder_config"
    default_theta = 640000.0

    vocab_size: int = 0
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 16
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 64
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    attention_dropout: float | int = 0.1

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)


@strict
class MiMoAudioConfig(PreTrainedConfig):
    r"""
    Configuration of [`MiMoAudioForConditionalGeneration`]. The defaults give the released MiMo-Audio-7B model.

    Args:
        text_config (`Qwen2Config` or `dict`, *optional*):
            The Qwen2 backbone (the LLM). One position per text token or per audio patch.
        patch_encoder_config (`MiMoAudioPatchEncoderConfig` or `dict`, *optional*):
            The patch encoder that turns the `group_size` frames of one patch into one backbone input.
        patch_decoder_config (`MiMoAudioPatchDecoderConfig` or `dict`, *optional*):
            The patch decoder that emits the codes of one patch from a backbone hidden state.
        group_size (`int`, *optional*, defaults to 4):
            Audio frames (25 Hz) per patch, i.e. per backbone position.
        audio_channels (`int`, *optional*, defaults to 8):
            Number of codebooks (RVQ levels of the audio tokenizer) the model reads and writes.
        audio_vocab_sizes (`list[int]`, *optional*):
            Size of each codebook's embedding table and head, including the empty id.
        audio_empty_ids (`list[int]`, *optional*):
            Per codebook, the id meaning "no audio" (its embedding is masked to zero in the input).
        delay_pattern (`list[int]`, *optional*):
            Per codebook, the patch decoder step at which that codebook starts (intra-patch delay).
        input_full_attention (`bool`, *optional*, defaults to `True`):
            Whether the patch encoder attends bidirectionally inside a patch (`False`: causal).
        empty_token_id, sosp_token_id, eosp_token_id, sostm_token_id, eostm_token_id, eot_token_id,
        im_start_token_id, im_end_token_id (`int`):
            Ids of `<|empty|>` (the text id of an audio position), `<|sosp|>`, `<|eosp|>`, `<|sostm|>`, `<|eostm|>`,
            `<|eot|>`, `<|im_start|>` and `<|im_end|>`.
        text_loss_weight (`float`, *optional*, defaults to 100.0):
            Weight of the text loss in the total loss.
        audio_loss_weights (`list[float]`, *optional*):
            Weight of each codebook's loss. Defaults to 12, 8, 6, 4, 2, 2, 1, 1 for 8 codebooks (the official recipe);
            for other counts the first entries of that list, then 1 for every further codebook.
        empty_token_loss_weight (`float`, *optional*, defaults to 0.01):
            Weight of text targets equal to `<|empty|>` in the text loss.
        model_variant (`str`, *optional*, defaults to `"mimo-audio"`):
            The release the weights come from: `"mimo-audio"` (MiMo-Audio-7B-Base / -Instruct) or `"mimo-v2.5-asr"`
            (MiMo-V2.5-ASR, whose processor cuts audio into 30 s chunks and tags the ASR answer with its language).
        original_extra_config (`dict`, *optional*):
            Keys of the original `config.json` that no part of the model reads (training switches such as `n_rvq` or
            `no_text_loss`, the V2.5-ASR release's nested `audio_config` minus the values it repeats), kept as they
            were so that nothing of the original config is dropped.

    The original checkpoints store a flat Qwen2 config (`model_type: "qwen2"`) with dash-separated strings; those are
    translated on load (see [`convert_original_config_dict`]).
    """

    model_type = "mimo_audio"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=_DEFAULT_TEXT_CONFIG),
        "patch_encoder_config": MiMoAudioPatchEncoderConfig,
        "patch_decoder_config": MiMoAudioPatchDecoderConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    patch_encoder_config: dict | PreTrainedConfig | None = None
    patch_decoder_config: dict | PreTrainedConfig | None = None
    group_size: int = 4
    audio_channels: int = 8
    audio_vocab_sizes: list[int] | None = None
    audio_empty_ids: list[int] | None = None
    delay_pattern: list[int] | None = None
    input_full_attention: bool = True
    empty_token_id: int = DEFAULT_SPECIAL_TOKEN_IDS["empty_token_id"]
    sosp_token_id: int = DEFAULT_SPECIAL_TOKEN_IDS["sosp_token_id"]
    eosp_token_id: int = DEFAULT_SPECIAL_TOKEN_IDS["eosp_token_id"]
    sostm_token_id: int = DEFAULT_SPECIAL_TOKEN_IDS["sostm_token_id"]
    eostm_token_id: int = DEFAULT_SPECIAL_TOKEN_IDS["eostm_token_id"]
    eot_token_id: int = DEFAULT_SPECIAL_TOKEN_IDS["eot_token_id"]
    im_start_token_id: int = DEFAULT_SPECIAL_TOKEN_IDS["im_start_token_id"]
    im_end_token_id: int = DEFAULT_SPECIAL_TOKEN_IDS["im_end_token_id"]
    text_loss_weight: float = 100.0
    audio_loss_weights: list[float] | None = None
    empty_token_loss_weight: float = 0.01
    tie_word_embeddings: bool = False
    model_variant: str = "mimo-audio"
    original_extra_config: dict | None = None

    def __post_init__(self, **kwargs):
        if self.audio_vocab_sizes is None:
            self.audio_vocab_sizes = [1025, 1025] + [129] * (self.audio_channels - 2)
        if self.audio_empty_ids is None:
            self.audio_empty_ids = [size - 1 for size in self.audio_vocab_sizes]
        if self.delay_pattern is None:
            self.delay_pattern = list(range(self.audio_channels))
        if self.audio_loss_weights is None:
            extra = max(self.audio_channels - len(_DEFAULT_AUDIO_LOSS_WEIGHTS), 0)
            self.audio_loss_weights = _DEFAULT_AUDIO_LOSS_WEIGHTS[: self.audio_channels] + [1.0] * extra
        self.validate_architecture()  # raise a plain ValueError early, before the strict-dataclass wrapper
        super().__post_init__(**kwargs)
        vocab_size = self.text_config.vocab_size
        if not 0 <= self.empty_token_id < vocab_size:
            raise ValueError(
                f"`empty_token_id` ({self.empty_token_id}) is outside the text vocabulary ({vocab_size} tokens), so no "
                "position could ever be read as audio: set the special token ids to the tokenizer's (for an original "
                "checkpoint, keep its tokenizer files next to config.json)."
            )

    def validate_architecture(self):
        """Checks that the per-codebook lists agree with `audio_channels` and with each other."""
        for name in ("audio_vocab_sizes", "audio_empty_ids", "delay_pattern", "audio_loss_weights"):
            value = getattr(self, name)
            if len(value) != self.audio_channels:
                raise ValueError(f"`{name}` has {len(value)} entries but `audio_channels` is {self.audio_channels}.")
        for channel, (size, empty) in enumerate(zip(self.audio_vocab_sizes, self.audio_empty_ids)):
            if not 0 <= empty < size:
                raise ValueError(f"`audio_empty_ids[{channel}]`={empty} is outside codebook {channel} (size {size}).")
        if min(self.delay_pattern) < 0:
            raise ValueError(f"`delay_pattern` must be non-negative, got {self.delay_pattern}.")
        if self.group_size < 1:
            raise ValueError(f"`group_size` must be positive, got {self.group_size}.")
        if self.model_variant not in MODEL_VARIANTS:
            raise ValueError(f"`model_variant` must be one of {list(MODEL_VARIANTS)}, got {self.model_variant!r}.")

    @property
    def patch_decoder_steps(self) -> int:
        """Number of patch decoder positions per patch: `group_size + max(delay_pattern)`."""
        return self.group_size + max(self.delay_pattern)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if is_original_config_dict(config_dict):
            special_ids = read_special_token_ids(pretrained_model_name_or_path, **kwargs)
            config_dict = convert_original_config_dict(config_dict, special_ids)
        return config_dict, kwargs


def is_original_config_dict(config_dict: dict) -> bool:
    """Whether `config_dict` is the flat Qwen2-style config of an original MiMo-Audio checkpoint."""
    return config_dict.get("model_type") != MiMoAudioConfig.model_type and "speech_vocab_size" in config_dict


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
    patch_decoder_config = {
        **inherited,
        "hidden_size": local_dim,
        "num_hidden_layers": int(config_dict.get("local_layers", 16)),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": local_dim // heads,
        "intermediate_size": int(config_dict.get("local_ffn_dim", 4096)),
        "attention_dropout": dropout,
    }
    patch_encoder_config = {
        **inherited,
        "hidden_size": encoder_dim,
        "num_hidden_layers": int(config_dict.get("input_local_layers", 6)),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": encoder_dim // heads,
        "intermediate_size": 4 * encoder_dim,
        "attention_dropout": dropout,
    }
    converted = {
        "model_type": MiMoAudioConfig.model_type,
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
            f"use the backbone's `rope_theta`={rope_theta!r} (as the original code does). Fix one of them in config.json."
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


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "_commit_hash")


def route_original_checkpoints_to_mimo_audio():
    """
    Make `AutoConfig.from_pretrained` (and so `AutoModel.from_pretrained`, `AutoProcessor`, ...) read an original
    MiMo-Audio or MiMo-V2.5-ASR directory as a [`MiMoAudioConfig`]. Their `config.json` says `model_type: "qwen2"`,
    which Transformers would load as a plain Qwen2 model that ignores every audio weight. Other Qwen2 checkpoints are
    untouched. Called once when `transformers_mimo` is imported.
    """
    if getattr(AutoConfig.from_pretrained, "_routes_original_mimo_audio", False):
        return
    auto_from_pretrained = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        lookup = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        try:
            config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **lookup)
        except Exception:  # not readable here: the Auto loader reports it
            config_dict = {}
        if not is_original_config_dict(config_dict):
            return auto_from_pretrained(cls, pretrained_model_name_or_path, **kwargs)
        for key in ("code_revision", "trust_remote_code"):
            kwargs.pop(key, None)
        return MiMoAudioConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)

    from_pretrained._routes_original_mimo_audio = True
    from_pretrained.__doc__ = AutoConfig.from_pretrained.__doc__
    AutoConfig.from_pretrained = classmethod(from_pretrained)


def special_token_ids_from_vocab(token_to_id: dict[str, int]) -> dict[str, int]:
    """Picks the config's special token ids (`empty_token_id`, ...) out of a token -> id mapping."""
    return {field: token_to_id[token] for field, token in SPECIAL_TOKENS.items() if token in token_to_id}


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
    missing = sorted(set(SPECIAL_TOKENS) - set(found))
    if missing:
        logger.info(f"Special tokens not found in the tokenizer files, using the released model's ids for {missing}.")
    return found


__all__ = [
    "MODEL_VARIANTS",
    "V25_ASR_ARCHITECTURE",
    "MiMoAudioConfig",
    "MiMoAudioPatchEncoderConfig",
    "MiMoAudioPatchDecoderConfig",
]
