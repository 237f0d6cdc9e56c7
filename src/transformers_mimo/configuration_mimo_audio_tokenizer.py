"""Configuration of the MiMo-Audio tokenizer (the audio codec of MiMo-Audio)."""

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import auto_docstring


def _default_codebook_size() -> list[int]:
    return [1024, 1024] + [128] * 18


@auto_docstring(
    checkpoint="XiaomiMiMo/MiMo-Audio-Tokenizer",
    custom_intro="""
    Configuration of [`MiMoAudioTokenizerModel`]: a transformer encoder over log-mel frames followed by a residual
    vector quantizer (25 Hz codes), and a transformer decoder plus a transformer vocoder with an ISTFT head (24 kHz).
    It reads the original `config.json` of `XiaomiMiMo/MiMo-Audio-Tokenizer` directly (with or without
    `model_type`). The defaults are those of the released checkpoint.
    """,
)
@strict(accept_kwargs=True)
class MiMoAudioTokenizerConfig(PreTrainedConfig):
    r"""
    max_audio_seconds (`int`, *optional*, defaults to 1800):
        Kept from the original config; unused.
    stride_size (`int`, *optional*, defaults to 2):
        Stride of the encoder's second convolution.
    avg_pooler (`int`, *optional*, defaults to 2):
        Downsampling factor after the encoder transformer (and the matching upsampling of the decoder). 1 disables
        it.
    d_model (`int`, *optional*, defaults to 1280):
        Hidden size of the encoder, the quantizer and the decoder.
    scale_embedding (`bool`, *optional*, defaults to `False`):
        Kept from the original config; unused.
    kernel_size (`int`, *optional*, defaults to 3):
        Kernel size of the encoder convolutions.
    activation_function (`str`, *optional*, defaults to `"gelu"`):
        Activation of the feed-forward layers.
    encoder_layers (`int`, *optional*, defaults to 32):
        Number of encoder transformer layers.
    encoder_skip_layer_id (`int`, *optional*, defaults to 3):
        The output of this (1-based) encoder layer is added to the last layer's output before the final norm. `None`
        or 0 disables it (as in the original).
    encoder_attention_heads (`int`, *optional*, defaults to 20):
        Attention heads of the encoder layers.
    encoder_ffn_dim (`int`, *optional*, defaults to 5120):
        Feed-forward width of the encoder layers.
    encoder_causal (`bool`, *optional*, defaults to `False`):
        Causal encoder attention.
    encoder_attn_window_size (`list[int]`, *optional*, defaults to `[-1, -1]`):
        `[left, right]` attention window of the encoder (a query at `i` sees keys `i-left .. i+right`); `-1` means
        unlimited.
    decoder_layers (`int`, *optional*, defaults to 32):
        Number of decoder transformer layers.
    decoder_attention_heads (`int`, *optional*, defaults to 20):
        Attention heads of the decoder layers.
    decoder_ffn_dim (`int`, *optional*, defaults to 5120):
        Feed-forward width of the decoder layers.
    decoder_kernel_size (`int`, *optional*, defaults to 3):
        Kernel size of the decoder's last transposed convolution (to mels).
    decoder_stride_size (`int`, *optional*, defaults to 2):
        Stride of the decoder's last transposed convolution (to mels).
    decoder_causal (`bool`, *optional*, defaults to `True`):
        Causal decoder attention.
    decoder_attn_window_size (`list[int]`, *optional*, defaults to `[-1, -1]`):
        Decoder attention window, as `encoder_attn_window_size`.
    nfft (`int`, *optional*, defaults to 960):
        FFT size (and window length) of the vocoder's ISTFT head.
    vocoder_dim (`int`, *optional*, defaults to 256):
        Hidden size of the vocoder.
    vocoder_intermediate_dim (`int`, *optional*, defaults to 1024):
        Feed-forward width of the vocoder layers.
    vocoder_num_layers (`int`, *optional*, defaults to 16):
        Number of vocoder transformer layers.
    vocoder_attention_heads (`int`, *optional*, defaults to 16):
        Attention heads of the vocoder layers.
    vocoder_attn_window_size (`list[int]`, *optional*, defaults to `[40, 10]`):
        Vocoder attention window, as `encoder_attn_window_size`.
    vocoder_padding (`str`, *optional*, defaults to `"same"`):
        ISTFT padding, `"same"` or `"center"`.
    n_mels (`int`, *optional*, defaults to 128):
        Number of mel bins of the input features.
    sampling_rate (`int`, *optional*, defaults to 24000):
        Audio sampling rate.
    hop_length (`int`, *optional*, defaults to 240):
        Hop of the mel frames and of the ISTFT.
    window_size (`int`, *optional*, defaults to 960):
        STFT window of the mel front end (the ISTFT uses `nfft`).
    fmin (`int`, *optional*, defaults to 0):
        Lowest frequency of the mel front end.
    fmax (`int`, *optional*):
        Highest frequency of the mel front end (the Nyquist frequency when `None`).
    num_quantizers (`int`, *optional*, defaults to 20):
        Number of residual quantizers.
    codebook_size (`list[int]`, *optional*, defaults to `[1024, 1024, 128, ...]`):
        Size of each codebook. A shorter list is extended with its last value (an int means the same size for every
        quantizer).
    threshold_ema_dead_code (`int`, *optional*, defaults to 2):
        Training-only setting kept from the original config.
    position_embedding_type (`str`, *optional*, defaults to `"rope"`):
        Position embeddings; only `"rope"` exists.
    rope_theta (`float`, *optional*, defaults to 10000.0):
        Base period of the rotary position embeddings.
    rope_type (`str`, *optional*, defaults to `"default"`):
        Rotary embedding variant; only `"default"` exists.
    ln_type (`str`, *optional*, defaults to `"LayerNorm"`):
        `"LayerNorm"` or `"RMSNorm"`.
    segment_length (`int`, *optional*, defaults to 6000):
        Long inputs are encoded in segments of this many mel frames (60 s), each on its own, as the original does.
    streaming_left_overlap (`int`, *optional*, defaults to 250):
        Codes of left context kept by `streaming_decode`.
    streaming_right_overlap (`int`, *optional*, defaults to 40):
        Codes held back by `streaming_decode` until more arrive.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the random initialisation.

    Example:

    ```python
    >>> from transformers_mimo import MiMoAudioTokenizerConfig, MiMoAudioTokenizerModel

    >>> config = MiMoAudioTokenizerConfig(d_model=64, encoder_layers=2, decoder_layers=2, vocoder_num_layers=2)
    >>> model = MiMoAudioTokenizerModel(config)
    ```
    """

    model_type = "mimo_audio_tokenizer"

    max_audio_seconds: int = 1800
    stride_size: int = 2
    avg_pooler: int = 2
    d_model: int = 1280
    scale_embedding: bool = False
    kernel_size: int = 3
    activation_function: str = "gelu"
    encoder_layers: int = 32
    encoder_skip_layer_id: int | None = 3
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    encoder_causal: bool = False
    encoder_attn_window_size: list[int] | tuple[int, ...] = (-1, -1)
    decoder_layers: int = 32
    decoder_attention_heads: int = 20
    decoder_ffn_dim: int = 5120
    decoder_kernel_size: int = 3
    decoder_stride_size: int = 2
    decoder_causal: bool = True
    decoder_attn_window_size: list[int] | tuple[int, ...] = (-1, -1)
    nfft: int = 960
    vocoder_dim: int = 256
    vocoder_intermediate_dim: int = 1024
    vocoder_num_layers: int = 16
    vocoder_attention_heads: int = 16
    vocoder_attn_window_size: list[int] | tuple[int, ...] = (40, 10)
    vocoder_padding: str = "same"
    n_mels: int = 128
    sampling_rate: int = 24000
    hop_length: int = 240
    window_size: int = 960
    fmin: int | float = 0
    fmax: int | float | None = None
    num_quantizers: int = 20
    codebook_size: list[int] | int | None = None
    threshold_ema_dead_code: int = 2
    position_embedding_type: str = "rope"
    rope_theta: int | float = 10000.0
    rope_type: str = "default"
    ln_type: str = "LayerNorm"
    segment_length: int = 6000
    streaming_left_overlap: int = 250
    streaming_right_overlap: int = 40
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # New lists: never alias (or mutate) a list the caller passed in (original quirk T6).
        if self.codebook_size is None:
            self.codebook_size = _default_codebook_size()
        elif isinstance(self.codebook_size, int):
            self.codebook_size = [self.codebook_size] * self.num_quantizers
        else:
            sizes = list(self.codebook_size)
            if 0 < len(sizes) < self.num_quantizers:
                sizes += [sizes[-1]] * (self.num_quantizers - len(sizes))
            self.codebook_size = sizes
        for name in ("encoder_attn_window_size", "decoder_attn_window_size", "vocoder_attn_window_size"):
            setattr(self, name, list(getattr(self, name)))
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks that the sizes fit together (called on init by the strict dataclass machinery)."""
        for prefix, dim, heads in (
            ("encoder", self.d_model, self.encoder_attention_heads),
            ("decoder", self.d_model, self.decoder_attention_heads),
            ("vocoder", self.vocoder_dim, self.vocoder_attention_heads),
        ):
            if heads <= 0 or dim % heads != 0 or (dim // heads) % 2 != 0:
                raise ValueError(
                    f"{prefix}: the hidden size ({dim}) must split into {heads} heads of an even head size."
                )
            window = getattr(self, f"{prefix}_attn_window_size")
            if len(window) != 2 or any(side < -1 for side in window):
                raise ValueError(f"`{prefix}_attn_window_size` must be [left, right] with values >= -1, got {window}.")
        if self.num_quantizers < 1:
            raise ValueError(f"`num_quantizers` must be at least 1, got {self.num_quantizers}.")
        if len(self.codebook_size) < self.num_quantizers or min(self.codebook_size) < 1:
            raise ValueError(
                f"`codebook_size` must give a positive size for each of the {self.num_quantizers} quantizers, "
                f"got {self.codebook_size}."
            )
        if self.encoder_skip_layer_id is not None and not 0 <= self.encoder_skip_layer_id <= self.encoder_layers:
            raise ValueError(
                f"`encoder_skip_layer_id` must be in [0, {self.encoder_layers}] or None, "
                f"got {self.encoder_skip_layer_id}."
            )
        if self.vocoder_padding not in ("same", "center"):
            raise ValueError(f"`vocoder_padding` must be 'same' or 'center', got {self.vocoder_padding!r}.")
        if self.ln_type not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"`ln_type` must be 'LayerNorm' or 'RMSNorm', got {self.ln_type!r}.")
        if self.position_embedding_type != "rope" or self.rope_type != "default":
            raise ValueError(
                "Only rotary position embeddings of type 'default' exist for this model, got "
                f"position_embedding_type={self.position_embedding_type!r}, rope_type={self.rope_type!r}."
            )
        if self.activation_function not in ACT2FN:
            raise ValueError(f"Unknown `activation_function` {self.activation_function!r}.")
        if min(self.stride_size, self.avg_pooler, self.kernel_size, self.decoder_stride_size) < 1:
            raise ValueError("Kernel sizes, strides and `avg_pooler` must be positive.")
        if self.segment_length < 1:
            raise ValueError(f"`segment_length` must be positive, got {self.segment_length}.")
        if not self.streaming_left_overlap >= self.streaming_right_overlap >= 0:
            raise ValueError(
                "Streaming needs `streaming_left_overlap >= streaming_right_overlap >= 0`, got "
                f"{self.streaming_left_overlap} and {self.streaming_right_overlap}."
            )

    @property
    def frame_rate(self) -> float:
        """Codes per second (25 for the released checkpoint)."""
        return self.sampling_rate / self.samples_per_code

    @property
    def samples_per_code(self) -> int:
        """Waveform samples per code frame (960 for the released checkpoint)."""
        return self.hop_length * self.stride_size * self.avg_pooler


__all__ = ["MiMoAudioTokenizerConfig"]
