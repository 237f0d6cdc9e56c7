"""MiMo-Audio language model configuration."""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.utils import auto_docstring, logging

from .conversion_mapping_mimo_audio import (
    convert_original_config_dict,
    is_original_config_dict,
    read_special_token_ids,
)


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

# `MiMoAudioConfig.model_variant`: which release a checkpoint comes from. It decides the processor's audio recipe and
# ASR prompt and the generation defaults written by the conversion.
MODEL_VARIANTS = ("mimo-audio", "mimo-v2.5-asr")


def default_audio_empty_ids(audio_channels: int) -> list[int]:
    """Each codebook's empty id in the released checkpoints (its codec codebook size): 1024 for the first two
    codebooks, 128 for the others; the default of the processor's `audio_empty_ids`."""
    return ([1024, 1024] + [128] * audio_channels)[:audio_channels]


# Loss weights of the official training recipe for 8 codebooks (text weight 100, sum 136).
_DEFAULT_AUDIO_LOSS_WEIGHTS = [12.0, 8.0, 6.0, 4.0, 2.0, 2.0, 1.0, 1.0]


@strict
class MiMoAudioPatchTransformerConfig(Qwen2Config):
    r"""
    The fields and defaults shared by [`MiMoAudioPatchEncoderConfig`] and [`MiMoAudioPatchDecoderConfig`]: a stack of
    Qwen2 decoder layers without an embedding table (`vocab_size` 0), 64 heads of dim `hidden_size //
    num_attention_heads` (the original's split), RoPE theta 640000 like the backbone. Not used on its own.
    """

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


@auto_docstring(
    checkpoint="XiaomiMiMo/MiMo-Audio-7B-Instruct",
    custom_intro="""
    Configuration of the MiMo-Audio patch encoder: a stack of Qwen2 decoder layers (no embedding table) that mixes
    the `group_size` frames of one audio patch. Whether it attends bidirectionally inside a patch is set by
    [`MiMoAudioConfig.input_full_attention`]. The defaults give the released model's (6 layers); the arguments are
    those of [`Qwen2Config`].
    """,
)
@strict
class MiMoAudioPatchEncoderConfig(MiMoAudioPatchTransformerConfig):
    model_type = "mimo_audio_patch_encoder"
    base_config_key = "patch_encoder_config"


@auto_docstring(
    checkpoint="XiaomiMiMo/MiMo-Audio-7B-Instruct",
    custom_intro="""
    Configuration of the MiMo-Audio patch decoder: a causal stack of Qwen2 decoder layers (no embedding table) that
    produces the codes of one audio patch from a backbone hidden state, with one output head per codebook. The
    defaults give the released model's (16 layers); the arguments are those of [`Qwen2Config`].
    """,
)
@strict
class MiMoAudioPatchDecoderConfig(MiMoAudioPatchTransformerConfig):
    model_type = "mimo_audio_patch_decoder"
    base_config_key = "patch_decoder_config"

    num_hidden_layers: int = 16


@auto_docstring(
    checkpoint="XiaomiMiMo/MiMo-Audio-7B-Instruct",
    custom_intro="""
    Configuration of [`MiMoAudioForConditionalGeneration`]. The defaults give the released MiMo-Audio-7B model.

    The original checkpoints store a flat Qwen2 config (`model_type: "qwen2"`) with dash-separated strings; those are
    translated on load (see [`convert_original_config_dict`]).
    """,
)
@strict
class MiMoAudioConfig(PreTrainedConfig):
    r"""
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
    empty_token_id (`int`, *optional*, defaults to 151667):
        Id of `<|empty|>`, the text id of an audio position.
    sosp_token_id (`int`, *optional*, defaults to 151665):
        Id of `<|sosp|>` (start of speech).
    eosp_token_id (`int`, *optional*, defaults to 151666):
        Id of `<|eosp|>` (end of speech).
    sostm_token_id (`int`, *optional*, defaults to 151670):
        Id of `<|sostm|>` (start of the assistant speech stream).
    eostm_token_id (`int`, *optional*, defaults to 151671):
        Id of `<|eostm|>` (end of the assistant speech stream).
    eot_token_id (`int`, *optional*, defaults to 151672):
        Id of `<|eot|>` (end of the text inside the speech stream).
    im_start_token_id (`int`, *optional*, defaults to 151644):
        Id of `<|im_start|>`.
    im_end_token_id (`int`, *optional*, defaults to 151645):
        Id of `<|im_end|>`.
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


__all__ = [
    "MODEL_VARIANTS",
    "MiMoAudioConfig",
    "MiMoAudioPatchEncoderConfig",
    "MiMoAudioPatchDecoderConfig",
]
