"""MiMo-Audio tokenizer: log-mel frames -> residual-VQ codes (25 Hz) -> 24 kHz waveform.

Pure PyTorch port of the codec of Xiaomi's MiMo-Audio. Batches are padded (with masks) instead of packed, and every
item of a batch gives the same result as that item alone. Attention runs through Transformers' attention interface
(`attn_implementation="eager"` or `"sdpa"`); an attention window (`*_attn_window_size`) is computed block by block, so
its memory grows linearly with the length.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedAudioTokenizerBase
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, ModelOutput, auto_docstring, cached_file

from .configuration_mimo_audio_tokenizer import MiMoAudioTokenizerConfig
from .conversion_mapping_mimo_audio import (
    HUB_KWARGS,
    ORIGINAL_TOKENIZER_IGNORED_KEYS,
    ORIGINAL_TOKENIZER_KEY_MAPPING,
    ORIGINAL_TOKENIZER_WINDOW_KEY,
    check_original_istft_window,
    is_original_tokenizer_key,
)


# The original decodes generated codes in segments of this many frames (60 s at 25 Hz).
DECODE_SEGMENT_FRAMES = 1500


def _original_checkpoint_window(pretrained_model_name_or_path, hub_kwargs: dict) -> tuple[bool, torch.Tensor | None]:
    """
    Whether the safetensors checkpoint is in the original layout (its keys need `ORIGINAL_TOKENIZER_KEY_MAPPING`), and
    the ISTFT window it stores (`None` where there is none).
    """
    hub_kwargs = {**hub_kwargs, "_raise_exceptions_for_missing_entries": False}
    index = cached_file(pretrained_model_name_or_path, SAFE_WEIGHTS_INDEX_NAME, **hub_kwargs)
    if index is None:
        filenames = [SAFE_WEIGHTS_NAME]
    else:
        with open(index) as file:
            filenames = sorted(set(json.load(file)["weight_map"].values()))
    is_original, window = False, None
    for filename in filenames:
        path = cached_file(pretrained_model_name_or_path, filename, **hub_kwargs)
        if path is None:
            continue
        with safe_open(path, framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
            is_original |= any(is_original_tokenizer_key(key) for key in keys)
            if ORIGINAL_TOKENIZER_WINDOW_KEY in keys:
                window = checkpoint.get_tensor(ORIGINAL_TOKENIZER_WINDOW_KEY)
    return is_original, window


@dataclass
@auto_docstring
class MiMoAudioTokenizerEncoderOutput(ModelOutput):
    r"""
    audio_codes (`torch.LongTensor` of shape `(batch_size, num_quantizers, codes_length)`):
        Residual-VQ codes at 25 Hz, 0 at padded positions.
    audio_codes_mask (`torch.LongTensor` of shape `(batch_size, codes_length)`):
        1 for valid code frames, 0 for padding.
    unquantized_hidden_states (`torch.FloatTensor` of shape `(batch_size, codes_length, d_model)`):
        Encoder output before quantization, 0 at padded positions.
    quantized_hidden_states (`torch.FloatTensor` of shape `(batch_size, codes_length, d_model)`):
        Sum of the selected codebook vectors of the quantizers used, 0 at padded positions.
    """

    audio_codes: torch.LongTensor | None = None
    audio_codes_mask: torch.LongTensor | None = None
    unquantized_hidden_states: torch.FloatTensor | None = None
    quantized_hidden_states: torch.FloatTensor | None = None


@dataclass
@auto_docstring
class MiMoAudioTokenizerDecoderOutput(ModelOutput):
    r"""
    audio_values (`torch.FloatTensor` of shape `(batch_size, 1, samples)`):
        Float32 waveform at `config.sampling_rate`, 0 beyond each item's length.
    audio_values_lengths (`torch.LongTensor` of shape `(batch_size,)`):
        Number of valid samples of each item.
    """

    audio_values: torch.FloatTensor | None = None
    audio_values_lengths: torch.LongTensor | None = None


@dataclass
class MiMoAudioTokenizerStreamingCache:
    """State of [`MiMoAudioTokenizerModel.streaming_decode`] between calls, one entry per stream.

    `audio_codes[i]` holds the codes `(num_quantizers, n)` kept as left context of stream `i`, and
    `processed_lengths[i]` how many of them have already been turned into returned audio.
    """

    audio_codes: list[torch.LongTensor] = field(default_factory=list)
    processed_lengths: list[int] = field(default_factory=list)


@dataclass
@auto_docstring
class MiMoAudioTokenizerStreamingDecoderOutput(ModelOutput):
    r"""
    audio_values (`torch.FloatTensor` of shape `(batch_size, 1, samples)`):
        New float32 audio of each stream for this call, 0 beyond each stream's length.
    audio_values_lengths (`torch.LongTensor` of shape `(batch_size,)`):
        Number of new samples of each stream (0 when a stream holds its audio back for more context).
    cache ([`MiMoAudioTokenizerStreamingCache`]):
        State to pass to the next call.
    """

    audio_values: torch.FloatTensor | None = None
    audio_values_lengths: torch.LongTensor | None = None
    cache: MiMoAudioTokenizerStreamingCache | None = None


@dataclass
@auto_docstring
class MiMoAudioTokenizerOutput(ModelOutput):
    r"""
    audio_codes (`torch.LongTensor` of shape `(batch_size, num_quantizers, codes_length)`): see `encode`.
    audio_codes_mask (`torch.LongTensor` of shape `(batch_size, codes_length)`): see `encode`.
    audio_values (`torch.FloatTensor` of shape `(batch_size, 1, samples)`): reconstruction, see `decode`.
    audio_values_lengths (`torch.LongTensor` of shape `(batch_size,)`): see `decode`.
    """

    audio_codes: torch.LongTensor | None = None
    audio_codes_mask: torch.LongTensor | None = None
    audio_values: torch.FloatTensor | None = None
    audio_values_lengths: torch.LongTensor | None = None


def _sequence_mask(lengths: torch.Tensor, max_length: int) -> torch.BoolTensor:
    """`(batch, max_length)` mask, True before each length."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


def _check_clip(clip, name: str, rows: str) -> torch.Tensor:
    if not isinstance(clip, torch.Tensor) or clip.dim() != 2 or clip.shape[-1] == 0:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"`{name}` must have shape ({rows}, length >= 1), got {shape}.")
    return clip


def _run_in_segments(
    clips: list[torch.Tensor],
    segment_size: int,
    segments_per_call: int | None,
    progress: Callable[[int, int], None] | None,
    run: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """
    Cuts every clip `(rows, length)` into segments of `segment_size` along its last dim, runs `run(padded, mask)` on
    right-padded batches of at most `segments_per_call` segments (default: all), and concatenates each clip's outputs.

    `run` takes a batch `(batch, rows, longest)` and its mask `(batch, longest)` and returns the outputs
    `(batch, ..., out_length)` with each item's valid `out_lengths (batch,)`; `progress(done, total)` follows the
    segments.
    """
    if segment_size < 1 or (segments_per_call is not None and segments_per_call < 1):
        raise ValueError(
            f"The segment size ({segment_size}) and `segments_per_call` ({segments_per_call}) must be positive."
        )
    segments = [
        (clip, values[..., start : start + segment_size])
        for clip, values in enumerate(clips)
        for start in range(0, values.shape[-1], segment_size)
    ]
    per_call = segments_per_call or max(len(segments), 1)
    outputs = [[] for _ in clips]
    for first in range(0, len(segments), per_call):
        batch = segments[first : first + per_call]
        lengths = torch.tensor([segment.shape[-1] for _, segment in batch])
        padded = torch.stack([F.pad(segment, (0, int(lengths.max()) - segment.shape[-1])) for _, segment in batch])
        values, value_lengths = run(padded, _sequence_mask(lengths, padded.shape[-1]).long())
        for index, (clip, _) in enumerate(batch):
            outputs[clip].append(values[index, ..., : int(value_lengths[index])])
        if progress is not None:
            progress(first + len(batch), len(segments))
    return [torch.cat(pieces, dim=-1) for pieces in outputs]


def _lengths_from_mask(
    mask: torch.Tensor | None, batch_size: int, length: int, name: str, device, allow_empty: bool = False
) -> torch.LongTensor:
    """Validates a right-padding mask `(batch, length)` of 0/1 values and returns the valid length of each row."""
    if mask is None:
        return torch.full((batch_size,), length, dtype=torch.long, device=device)
    if not isinstance(mask, torch.Tensor) or mask.shape != (batch_size, length):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"`{name}` must have shape ({batch_size}, {length}), got {shape}.")
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"`{name}` must hold only 0/1 (or bool) values.")
    lengths = mask.to(device=device, dtype=torch.long).sum(-1)
    if not torch.equal(mask.to(device=device, dtype=torch.bool), _sequence_mask(lengths, length)):
        raise ValueError(f"`{name}` must be right-padded: ones first, then zeros, in every row.")
    if not allow_empty and (lengths == 0).any():
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"`{name}` marks no valid position for batch item(s) {empty}.")
    return lengths


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MiMoAudioTokenizerRotaryEmbedding(nn.Module):
    """Rotary position embedding; the frequencies are computed in float32 on every call (no dtype rounding)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    @torch.no_grad()
    def forward(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(cos, sin)` of shape `(length, head_dim)` for positions `0 .. length-1`."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        positions = torch.arange(length, device=device, dtype=torch.float32)
        freqs = (inv_freq[:, None] @ positions[None, :]).transpose(0, 1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class MiMoAudioTokenizerRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(self.weight.dtype)


def _norm_layer(config: MiMoAudioTokenizerConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if config.ln_type == "LayerNorm" else MiMoAudioTokenizerRMSNorm(dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.BoolTensor,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `query (b, h, q, d)`, `key/value (b, h, k, d)`, boolean `attention_mask (b, 1, q, k)` (True = attend). Returns the
    output `(b, q, h, d)` and the attention weights `(b, h, q, k)`, as the functions of Transformers' attention
    interface.
    """
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MiMoAudioTokenizerAttention(nn.Module):
    """Multi-head self-attention with rotary embeddings, an optional `[left, right]` window and causality.

    A query at position `i` attends the valid keys `j` with `i - left <= j <= i + right` (`-1` = unlimited; causal
    forces `right = 0`). Memory is linear in the sequence length: unpadded full or causal attention runs through SDPA
    without a mask; otherwise queries go in blocks, each against only the keys it can see, with its own mask.
    """

    query_block_size = 256  # queries per block when a side of the window is unlimited

    def __init__(self, config: MiMoAudioTokenizerConfig, embed_dim: int, num_heads: int, window, causal: bool):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # causality is part of the explicit boolean mask
        left, right = window
        self.left = None if left < 0 else left
        self.right = 0 if causal else (None if right < 0 else right)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=True)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def _allowed(self, query_positions, key_positions, lengths):
        """Boolean mask `(batch, ..., queries, keys)` from positions `(..., queries)` and `(..., keys)`: the window,
        causality and key validity. A query always sees itself, so padded queries never get an empty row."""
        relative = key_positions.unsqueeze(-2) - query_positions.unsqueeze(-1)
        allowed = torch.ones_like(relative, dtype=torch.bool)
        if self.left is not None:
            allowed &= relative >= -self.left
        if self.right is not None:
            allowed &= relative <= self.right
        lengths = lengths.view(-1, *[1] * key_positions.dim())
        key_valid = (key_positions >= 0).unsqueeze(0) & (key_positions.unsqueeze(0) < lengths)
        return (allowed.unsqueeze(0) & key_valid.unsqueeze(-2)) | (relative == 0).unsqueeze(0)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, lengths: torch.LongTensor) -> torch.Tensor:
        batch_size, length, _ = hidden_states.shape
        shape = (batch_size, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin

        # The masks below are boolean `(batch, 1, queries, keys)` masks (window, causality, padding), which `eager` and
        # `sdpa` take; the model declares no other implementation. A standalone module without one uses `sdpa`.
        implementation = self.config._attn_implementation or "sdpa"
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)

        unpadded = bool((lengths == length).all())
        if implementation == "sdpa" and unpadded and self.left is None and self.right in (None, 0):
            # Full (or causal) attention without padding: no mask, so SDPA can use its memory-efficient kernels.
            output, _ = attention(self, query, key, value, None, scaling=self.scaling, is_causal=self.right == 0)
        elif self.left is None or self.right is None:
            output = self._blocked_attention(attention, query, key, value, lengths)
        else:
            output = self._banded_attention(attention, query, key, value, lengths)
        return self.out_proj(output.reshape(batch_size, length, -1))

    def _blocked_attention(self, attention, query, key, value, lengths):
        """`query/key/value (batch, heads, length, head_dim)` -> `(batch, length, heads, head_dim)`: blocks of
        `query_block_size` queries, each against its reachable keys (all of them on an unlimited side)."""
        length = query.shape[2]
        outputs = []
        for start in range(0, length, self.query_block_size):
            end = min(start + self.query_block_size, length)
            key_start = 0 if self.left is None else max(start - self.left, 0)
            key_end = length if self.right is None else min(end + self.right, length)
            query_positions = torch.arange(start, end, device=query.device)
            key_positions = torch.arange(key_start, key_end, device=query.device)
            mask = self._allowed(query_positions, key_positions, lengths).unsqueeze(1)  # (batch, 1, block, keys)
            output, _ = attention(
                self,
                query[:, :, start:end],
                key[:, :, key_start:key_end],
                value[:, :, key_start:key_end],
                mask,
                scaling=self.scaling,
            )
            outputs.append(output)
        return torch.cat(outputs, dim=1)

    def _banded_attention(self, attention, query, key, value, lengths):
        """Both window sides limited: all query blocks at once, each against its band of `block + left + right`
        keys. Shapes as in `_blocked_attention`."""
        batch_size, num_heads, length, head_dim = query.shape
        block = max(self.left + self.right, 32)
        span = block + self.left + self.right
        num_blocks = -(-length // block)
        extra = num_blocks * block - length
        device = query.device

        query = F.pad(query, (0, 0, 0, extra)).view(batch_size, num_heads, num_blocks, block, head_dim)
        key, value = (
            F.pad(t, (0, 0, self.left, extra + self.right)).unfold(2, span, block).transpose(-1, -2)
            for t in (key, value)
        )
        query_positions = torch.arange(num_blocks * block, device=device).view(num_blocks, block)
        key_positions = (torch.arange(num_blocks, device=device) * block - self.left)[:, None] + torch.arange(
            span, device=device
        )
        mask = self._allowed(query_positions, key_positions, lengths)  # (batch, blocks, block, span)

        def fold_blocks(t):
            return t.transpose(1, 2).reshape(batch_size * num_blocks, num_heads, t.shape[-2], head_dim)

        output, _ = attention(
            self,
            fold_blocks(query),
            fold_blocks(key),
            fold_blocks(value),
            mask.reshape(batch_size * num_blocks, 1, block, span),
            scaling=self.scaling,
        )
        return output.reshape(batch_size, num_blocks * block, num_heads, head_dim)[:, :length]


class MiMoAudioTokenizerTransformerLayer(nn.Module):
    """Pre-norm transformer layer (attention + feed-forward)."""

    def __init__(self, config, embed_dim, num_heads, ffn_dim, window, causal):
        super().__init__()
        self.self_attn = MiMoAudioTokenizerAttention(config, embed_dim, num_heads, window, causal)
        self.self_attn_layer_norm = _norm_layer(config, embed_dim)
        self.activation_fn = ACT2FN[config.activation_function]
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.final_layer_norm = _norm_layer(config, embed_dim)

    def forward(self, hidden_states, position_embeddings, lengths):
        residual = hidden_states
        hidden_states = self.self_attn(self.self_attn_layer_norm(hidden_states), position_embeddings, lengths)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))))
        hidden_states = residual + hidden_states
        if hidden_states.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


class MiMoAudioTokenizerTransformer(nn.Module):
    """A stack of transformer layers over padded sequences, positions restarting at 0 for every item."""

    def __init__(self, config, embed_dim, num_heads, ffn_dim, num_layers, window, causal):
        super().__init__()
        self.rotary_emb = MiMoAudioTokenizerRotaryEmbedding(embed_dim // num_heads, config.rope_theta)
        self.layers = nn.ModuleList(
            [
                MiMoAudioTokenizerTransformerLayer(config, embed_dim, num_heads, ffn_dim, window, causal)
                for _ in range(num_layers)
            ]
        )


class MiMoAudioTokenizerEncoder(MiMoAudioTokenizerTransformer):
    """Two convolutions (mel frames -> 50 Hz), transformer layers, optional average-pool downsampling (-> 25 Hz)."""

    def __init__(self, config: MiMoAudioTokenizerConfig):
        super().__init__(
            config,
            config.d_model,
            config.encoder_attention_heads,
            config.encoder_ffn_dim,
            config.encoder_layers,
            config.encoder_attn_window_size,
            config.encoder_causal,
        )
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.d_model, kernel_size=config.kernel_size, padding=1)
        self.conv2 = nn.Conv1d(
            config.d_model, config.d_model, kernel_size=config.kernel_size, stride=config.stride_size, padding=1
        )
        self.layer_norm = _norm_layer(config, config.d_model)
        if config.avg_pooler != 1:
            self.down_sample_layer = nn.Conv1d(
                config.d_model, config.d_model, config.avg_pooler, config.avg_pooler, bias=False
            )
            self.down_sample_norm = _norm_layer(config, config.d_model)

    def forward(self, input_features: torch.Tensor, lengths: torch.LongTensor):
        """`input_features (batch, n_mels, frames)`, `lengths (batch,)` -> `(hidden (batch, T, d_model), T lengths)`.
        Padded positions are zeroed between the stages, so each item is computed as if it were alone."""
        config = self.config
        valid = _sequence_mask(lengths, input_features.shape[-1]).unsqueeze(1)
        hidden = torch.where(valid, input_features, 0).to(self.conv1.weight.dtype)
        hidden = F.gelu(self.conv1(hidden))
        lengths = lengths + 3 - config.kernel_size
        hidden = hidden * _sequence_mask(lengths, hidden.shape[-1]).unsqueeze(1)
        hidden = F.gelu(self.conv2(hidden)).transpose(1, 2)
        lengths = (lengths + 2 - config.kernel_size) // config.stride_size + 1

        position_embeddings = self.rotary_emb(hidden.shape[1], hidden.device, hidden.dtype)
        skip = None
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, position_embeddings, lengths)
            if config.encoder_skip_layer_id and index == config.encoder_skip_layer_id - 1:
                skip = hidden
        if skip is not None:
            hidden = hidden + skip
        hidden = self.layer_norm(hidden)

        if config.avg_pooler != 1:
            hidden = hidden * _sequence_mask(lengths, hidden.shape[1]).unsqueeze(-1)
            hidden = F.pad(hidden, (0, 0, 0, -hidden.shape[1] % config.avg_pooler))
            hidden = F.gelu(self.down_sample_layer(hidden.transpose(1, 2))).transpose(1, 2)
            lengths = -(-lengths // config.avg_pooler)
            hidden = self.down_sample_norm(hidden)
        return hidden, lengths


class MiMoAudioTokenizerCodebook(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.zeros(codebook_size, dim))


class MiMoAudioTokenizerResidualVectorQuantizer(nn.Module):
    """Residual VQ with Euclidean codebooks; always computed in float32 (codebooks are upcast, as in the original)."""

    def __init__(self, config: MiMoAudioTokenizerConfig):
        super().__init__()
        self.codebook_sizes = list(config.codebook_size[: config.num_quantizers])
        self.layers = nn.ModuleList([MiMoAudioTokenizerCodebook(size, config.d_model) for size in self.codebook_sizes])

    def encode(self, hidden_states: torch.Tensor, num_quantizers: int) -> torch.LongTensor:
        """`hidden_states (n, d_model)` -> codes `(num_quantizers, n)`."""
        residual = hidden_states.float()
        codes = []
        for layer in self.layers[:num_quantizers]:
            embed = layer.embed.float()
            distances = -(
                residual.pow(2).sum(1, keepdim=True) - 2 * residual @ embed.t() + embed.t().pow(2).sum(0, keepdim=True)
            )
            indices = distances.max(dim=-1).indices
            residual = residual - F.embedding(indices, embed)
            codes.append(indices)
        return torch.stack(codes)

    def decode(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """codes `(num_quantizers, n)` -> float32 `(n, d_model)`."""
        quantized = torch.zeros(codes.shape[1], self.layers[0].embed.shape[1], device=codes.device)
        for layer, indices in zip(self.layers, codes):
            quantized = quantized + F.embedding(indices, layer.embed.float())
        return quantized


class MiMoAudioTokenizerGroupNormConvTranspose(nn.Module):
    """Transposed convolution, GroupNorm(1) over channels and each item's own valid frames, then the right frames
    that a causal layout drops (`kernel_size - stride`) are cut (the original `CausalConvTranspose1d`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        self.norm = nn.GroupNorm(1, out_channels)

    def forward(self, hidden_states: torch.Tensor, lengths: torch.LongTensor):
        kernel_size, stride = self.conv.kernel_size[0], self.conv.stride[0]
        hidden_states = hidden_states * _sequence_mask(lengths, hidden_states.shape[1]).unsqueeze(-1)
        hidden_states = self.conv(hidden_states.transpose(1, 2))
        lengths = (lengths - 1) * stride + kernel_size
        hidden_states = self._masked_group_norm(hidden_states, _sequence_mask(lengths, hidden_states.shape[-1]))
        trim = max(0, kernel_size - stride)
        hidden_states = hidden_states[:, :, : hidden_states.shape[-1] - trim]
        lengths = lengths - trim
        hidden_states = hidden_states * _sequence_mask(lengths, hidden_states.shape[-1]).unsqueeze(1)
        return hidden_states.transpose(1, 2), lengths

    def _masked_group_norm(self, hidden_states: torch.Tensor, mask: torch.BoolTensor) -> torch.Tensor:
        """GroupNorm with one group whose statistics use only the valid frames of each item (float32 math)."""
        values = hidden_states.float()
        weights = mask.unsqueeze(1).float()
        count = weights.sum(dim=(1, 2), keepdim=True) * values.shape[1]
        mean = (values * weights).sum(dim=(1, 2), keepdim=True) / count
        variance = ((values - mean).square() * weights).sum(dim=(1, 2), keepdim=True) / count
        normed = (values - mean) * torch.rsqrt(variance + self.norm.eps)
        normed = normed * self.norm.weight.float()[None, :, None] + self.norm.bias.float()[None, :, None]
        return normed.to(hidden_states.dtype)


class MiMoAudioTokenizerISTFTHead(nn.Module):
    """Linear -> log-magnitude and phase -> inverse STFT (overlap-add with window-envelope normalisation, float32).
    Frames beyond each item's length are left out of both the overlap-add and the envelope."""

    def __init__(self, config: MiMoAudioTokenizerConfig):
        super().__init__()
        self.n_fft = config.nfft
        self.hop_length = config.hop_length
        self.padding = (config.nfft - config.hop_length) // 2 if config.vocoder_padding == "same" else config.nfft // 2
        self.out = nn.Linear(config.vocoder_dim, config.nfft + 2)

    def forward(self, hidden_states: torch.Tensor, lengths: torch.LongTensor):
        hidden_states = self.out(hidden_states).transpose(1, 2)
        magnitude, phase = hidden_states.chunk(2, dim=1)
        magnitude = torch.clip(torch.exp(magnitude), max=1e2)
        real, imag = torch.cos(phase), torch.sin(phase)
        spectrum = magnitude.float() * (real.float() + 1j * imag.float())

        num_frames = spectrum.shape[-1]
        frame_mask = _sequence_mask(lengths, num_frames).float().unsqueeze(1)
        window = torch.hann_window(self.n_fft, dtype=torch.float32, device=spectrum.device)
        frames = torch.fft.irfft(spectrum, self.n_fft, dim=1, norm="backward") * window[None, :, None] * frame_mask
        output_size = (num_frames - 1) * self.hop_length + self.n_fft
        fold = {"output_size": (1, output_size), "kernel_size": (1, self.n_fft), "stride": (1, self.hop_length)}
        end = output_size - self.padding
        audio = F.fold(frames, **fold)[:, 0, 0, self.padding : end]
        envelope = F.fold(window.square()[None, :, None] * frame_mask, **fold)[:, 0, 0, self.padding : end]

        audio_lengths = (lengths - 1) * self.hop_length + self.n_fft - 2 * self.padding
        sample_mask = _sequence_mask(audio_lengths, audio.shape[-1])
        audio = torch.where(sample_mask, audio / torch.where(sample_mask, envelope, 1.0), 0.0)
        return audio, audio_lengths


class MiMoAudioTokenizerVocoder(MiMoAudioTokenizerTransformer):
    """Transformer vocoder (Vocos style) from coarse mels to a waveform."""

    def __init__(self, config: MiMoAudioTokenizerConfig):
        super().__init__(
            config,
            config.vocoder_dim,
            config.vocoder_attention_heads,
            config.vocoder_intermediate_dim,
            config.vocoder_num_layers,
            config.vocoder_attn_window_size,
            False,
        )
        self.embeddings = nn.Linear(config.n_mels, config.vocoder_dim, bias=False)
        self.layer_norm = _norm_layer(config, config.vocoder_dim)
        self.head = MiMoAudioTokenizerISTFTHead(config)

    def forward(self, mels: torch.Tensor, lengths: torch.LongTensor):
        hidden = self.embeddings(mels)
        position_embeddings = self.rotary_emb(hidden.shape[1], hidden.device, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, lengths)
        hidden = self.layer_norm(hidden) * _sequence_mask(lengths, hidden.shape[1]).unsqueeze(-1)
        return self.head(hidden, lengths)


class MiMoAudioTokenizerDecoder(MiMoAudioTokenizerTransformer):
    """Upsampling (inverse of the average pool), transformer layers, transposed convolution to mels, vocoder."""

    def __init__(self, config: MiMoAudioTokenizerConfig):
        super().__init__(
            config,
            config.d_model,
            config.decoder_attention_heads,
            config.decoder_ffn_dim,
            config.decoder_layers,
            config.decoder_attn_window_size,
            config.decoder_causal,
        )
        if config.avg_pooler != 1:
            self.dconv1 = MiMoAudioTokenizerGroupNormConvTranspose(
                config.d_model, config.d_model, config.avg_pooler, config.avg_pooler
            )
        self.layer_norm = _norm_layer(config, config.d_model)
        self.dconv2 = MiMoAudioTokenizerGroupNormConvTranspose(
            config.d_model, config.n_mels, config.decoder_kernel_size, config.decoder_stride_size
        )
        self.vocoder = MiMoAudioTokenizerVocoder(config)

    def forward(self, hidden: torch.Tensor, lengths: torch.LongTensor):
        """`hidden (batch, T, d_model)` (0 at padding) -> `(audio (batch, samples) float32, sample lengths)`."""
        hidden = hidden.to(self.layer_norm.weight.dtype)
        if hasattr(self, "dconv1"):
            hidden, lengths = self.dconv1(hidden, lengths)
        position_embeddings = self.rotary_emb(hidden.shape[1], hidden.device, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, lengths)
        hidden = self.layer_norm(hidden)
        mels, lengths = self.dconv2(hidden, lengths)
        return self.vocoder(mels, lengths)


@auto_docstring
class MiMoAudioTokenizerPreTrainedModel(PreTrainedAudioTokenizerBase):
    config: MiMoAudioTokenizerConfig
    config_class = MiMoAudioTokenizerConfig
    base_model_prefix = "model"
    main_input_name = "input_features"
    input_modalities = ("audio",)
    _supports_sdpa = True
    _no_split_modules = ["MiMoAudioTokenizerTransformerLayer"]
    # Deliberately unused tensors of original checkpoints (see `ORIGINAL_TOKENIZER_IGNORED_KEYS`).
    _keys_to_ignore_on_load_unexpected = list(ORIGINAL_TOKENIZER_IGNORED_KEYS)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MiMoAudioTokenizerCodebook):
            # A buffer filled from the checkpoint; initialised deterministically, as Mimi's codebook buffers.
            init.zeros_(module.embed)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        Loads a directory saved by this class or an ORIGINAL MiMo-Audio-Tokenizer directory (keys are renamed on load,
        see `ORIGINAL_TOKENIZER_KEY_MAPPING`).

        This package's layout follows Transformers: missing weights are initialised and reported with unexpected ones
        (a warning, and `output_loading_info=True`). Loading an original checkpoint is a conversion: there, a missing,
        unexpected or mis-shaped tensor raises a `ValueError`, as does an ISTFT window (not loaded: the model rebuilds
        it) that is not a periodic Hann window.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}
        key_mapping = dict(ORIGINAL_TOKENIZER_KEY_MAPPING)
        key_mapping.update(kwargs.pop("key_mapping", None) or {})
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, key_mapping=key_mapping, output_loading_info=True, **kwargs
        )
        is_original, window = _original_checkpoint_window(pretrained_model_name_or_path, hub_kwargs)
        if is_original:
            problems = {
                name: sorted(map(str, loading_info.get(name) or ()))
                for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
            }
            if any(problems.values()):
                raise ValueError(
                    f"Original checkpoint {pretrained_model_name_or_path} does not match the model: {problems}"
                )
        if window is not None:
            check_original_istft_window(window, model.config.nfft)
        # The renaming only translates original checkpoints; `save_pretrained` must write our own layout.
        model._weight_conversions = []
        return (model, loading_info) if output_loading_info else model


@auto_docstring(
    custom_intro="""
    The MiMo-Audio tokenizer: `encode` (log-mel -> codes), `decode` (codes -> waveform), `streaming_decode`.
    """
)
class MiMoAudioTokenizerModel(MiMoAudioTokenizerPreTrainedModel):
    def __init__(self, config: MiMoAudioTokenizerConfig):
        super().__init__(config)
        self.encoder = MiMoAudioTokenizerEncoder(config)
        self.quantizer = MiMoAudioTokenizerResidualVectorQuantizer(config)
        self.decoder = MiMoAudioTokenizerDecoder(config)
        self.post_init()

    def _check_num_quantizers(self, num_quantizers: int | None) -> int:
        if num_quantizers is None:
            return self.config.num_quantizers
        if isinstance(num_quantizers, bool) or not isinstance(num_quantizers, int):
            raise ValueError(f"`num_quantizers` must be an int, got {num_quantizers!r}.")
        if not 1 <= num_quantizers <= self.config.num_quantizers:
            raise ValueError(f"`num_quantizers` must be in [1, {self.config.num_quantizers}], got {num_quantizers}.")
        return num_quantizers

    @torch.no_grad()
    def encode(
        self,
        input_features: torch.FloatTensor,
        input_features_mask: torch.Tensor | None = None,
        num_quantizers: int | None = None,
    ) -> MiMoAudioTokenizerEncoderOutput:
        """Encodes log-mel features into codes.

        Args:
            input_features (`torch.FloatTensor` of shape `(batch_size, n_mels, frames)`): natural-log mel frames
                (100 per second), e.g. from `MiMoAudioFeatureExtractor`.
            input_features_mask (`torch.Tensor` of shape `(batch_size, frames)`, *optional*): 1 for valid frames,
                0 for right padding.
            num_quantizers (`int`, *optional*): number of quantizers to use (defaults to all).

        Each item is cut into segments of `config.segment_length` frames (the last one shorter) that are encoded
        independently, as in the original, and the codes of its segments are concatenated.

        Returns a [`MiMoAudioTokenizerEncoderOutput`]: `audio_codes (batch_size, num_quantizers, codes_length)`,
        `audio_codes_mask (batch_size, codes_length)` and the encoder states before and after quantization.
        """
        config = self.config
        num_quantizers = self._check_num_quantizers(num_quantizers)
        if not isinstance(input_features, torch.Tensor) or input_features.dim() != 3:
            shape = tuple(input_features.shape) if isinstance(input_features, torch.Tensor) else type(input_features)
            raise ValueError(f"`input_features` must have shape (batch, {config.n_mels}, frames), got {shape}.")
        batch_size, num_mels, num_frames = input_features.shape
        if num_mels != config.n_mels:
            raise ValueError(f"`input_features` must have {config.n_mels} mel bins in dim 1, got {num_mels}.")
        if batch_size == 0 or num_frames == 0:
            raise ValueError(f"`input_features` is empty (shape {tuple(input_features.shape)}).")
        if not input_features.is_floating_point():
            raise ValueError(f"`input_features` must be a floating point tensor, got {input_features.dtype}.")
        device = input_features.device
        lengths = _lengths_from_mask(input_features_mask, batch_size, num_frames, "input_features_mask", device)
        valid = _sequence_mask(lengths, num_frames).unsqueeze(1)
        if (~torch.isfinite(input_features) & valid).any():
            raise ValueError("`input_features` contains NaN or infinite values.")

        segments, segment_lengths, segments_per_item = [], [], []
        for item, length in enumerate(lengths.tolist()):
            starts = range(0, length, config.segment_length)
            segments_per_item.append(len(starts))
            for start in starts:
                segment_lengths.append(min(config.segment_length, length - start))
                segments.append(input_features[item, :, start : start + segment_lengths[-1]])
        segment_lengths = torch.tensor(segment_lengths, device=device)
        longest = int(segment_lengths.max())
        segments = torch.stack([F.pad(segment, (0, longest - segment.shape[-1])) for segment in segments])

        hidden, code_lengths = self.encoder(segments, segment_lengths)
        # Quantize only the valid frames, packed in (item, segment, time) order.
        packed = hidden[_sequence_mask(code_lengths, hidden.shape[1])]
        codes = self.quantizer.encode(packed, num_quantizers)
        quantized = self.quantizer.decode(codes).to(hidden.dtype)

        item_lengths = torch.stack([part.sum() for part in code_lengths.split(segments_per_item)])
        codes_mask = _sequence_mask(item_lengths, int(item_lengths.max()))
        audio_codes = codes.new_zeros(num_quantizers, batch_size, codes_mask.shape[1])
        audio_codes[:, codes_mask] = codes
        unquantized = hidden.new_zeros(batch_size, codes_mask.shape[1], hidden.shape[-1])
        unquantized[codes_mask] = packed
        quantized_hidden = torch.zeros_like(unquantized)
        quantized_hidden[codes_mask] = quantized
        return MiMoAudioTokenizerEncoderOutput(
            audio_codes=audio_codes.transpose(0, 1),
            audio_codes_mask=codes_mask.long(),
            unquantized_hidden_states=unquantized,
            quantized_hidden_states=quantized_hidden,
        )

    def _check_codes(self, audio_codes: torch.Tensor, name: str = "audio_codes") -> None:
        if not isinstance(audio_codes, torch.Tensor) or audio_codes.dim() != 3:
            shape = tuple(audio_codes.shape) if isinstance(audio_codes, torch.Tensor) else type(audio_codes)
            raise ValueError(f"`{name}` must have shape (batch, num_quantizers, codes_length), got {shape}.")
        if audio_codes.is_floating_point() or audio_codes.is_complex() or audio_codes.dtype == torch.bool:
            raise ValueError(f"`{name}` must be an integer tensor, got {audio_codes.dtype}.")
        if not 1 <= audio_codes.shape[1] <= self.config.num_quantizers:
            raise ValueError(
                f"`{name}` has {audio_codes.shape[1]} quantizers in dim 1; this model has 1 to "
                f"{self.config.num_quantizers}."
            )

    def _check_code_range(self, codes: torch.Tensor, valid: torch.BoolTensor) -> None:
        """Raises if a valid code lies outside its codebook. `codes (batch, nq, T)`, `valid (batch, T)`."""
        for index, size in enumerate(self.quantizer.codebook_sizes[: codes.shape[1]]):
            values = codes[:, index][valid]
            if values.numel() and (values.min() < 0 or values.max() >= size):
                raise ValueError(
                    f"`audio_codes` of quantizer {index} must lie in [0, {size - 1}], found values from "
                    f"{int(values.min())} to {int(values.max())}."
                )

    def _decode_valid(self, codes: torch.LongTensor, lengths: torch.LongTensor):
        """Decodes right-padded codes `(batch, nq, T)` with valid `lengths` -> (float32 audio, sample lengths)."""
        valid = _sequence_mask(lengths, codes.shape[-1])
        self._check_code_range(codes, valid)
        packed = codes.transpose(0, 1)[:, valid].long()
        hidden = torch.zeros(*valid.shape, self.config.d_model, device=codes.device)
        hidden[valid] = self.quantizer.decode(packed)
        return self.decoder(hidden, lengths)

    @torch.no_grad()
    def decode(
        self, audio_codes: torch.LongTensor, audio_codes_mask: torch.Tensor | None = None
    ) -> MiMoAudioTokenizerDecoderOutput:
        """Decodes codes into a waveform.

        Args:
            audio_codes (`torch.LongTensor` of shape `(batch_size, num_quantizers, codes_length)`): codes of the first
                `num_quantizers` quantizers (any number from 1 to `config.num_quantizers`; the LM uses 8).
            audio_codes_mask (`torch.Tensor` of shape `(batch_size, codes_length)`, *optional*): 1 for valid code
                frames, 0 for right padding (padded codes are ignored).

        Returns `audio_values (batch_size, 1, samples)` in float32 at `config.sampling_rate`
        (`config.samples_per_code` samples per code frame) and `audio_values_lengths`.
        """
        self._check_codes(audio_codes)
        batch_size, _, length = audio_codes.shape
        if batch_size == 0 or length == 0:
            raise ValueError(f"`audio_codes` is empty (shape {tuple(audio_codes.shape)}).")
        lengths = _lengths_from_mask(audio_codes_mask, batch_size, length, "audio_codes_mask", audio_codes.device)
        audio, audio_lengths = self._decode_valid(audio_codes, lengths)
        return MiMoAudioTokenizerDecoderOutput(audio_values=audio.unsqueeze(1), audio_values_lengths=audio_lengths)

    @torch.no_grad()
    def encode_clips(
        self,
        input_features: list[torch.FloatTensor],
        num_quantizers: int | None = None,
        segments_per_call: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[torch.LongTensor]:
        """Encodes the log-mel features of several clips of any lengths.

        Args:
            input_features (`list[torch.FloatTensor]`): one clip's features `(n_mels, frames)` per clip.
            num_quantizers (`int`, *optional*): number of quantizers to use (defaults to all).
            segments_per_call (`int`, *optional*): most segments per `encode` call (default: all in one call).
            progress (`Callable[[int, int], None]`, *optional*): called with `(segments done, segments)` after each
                call.

        Each clip is cut into segments of `config.segment_length` frames, which `encode` encodes independently; the
        segments of all clips go through `encode` in padded batches, and every segment gets the codes it gets alone,
        so the codes do not depend on `segments_per_call`.

        Returns:
            `list[torch.LongTensor]`: each clip's codes `(num_quantizers, codes_length)`, on the CPU.
        """

        def encode(features, mask):
            encoded = self.encode(features.to(self.device), mask.to(self.device), num_quantizers=num_quantizers)
            return encoded.audio_codes.cpu(), encoded.audio_codes_mask.sum(-1).cpu()

        checked = [
            _check_clip(features, f"input_features[{clip}]", "n_mels") for clip, features in enumerate(input_features)
        ]
        return _run_in_segments(checked, self.config.segment_length, segments_per_call, progress, encode)

    @torch.no_grad()
    def decode_clips(
        self,
        audio_codes: list[torch.LongTensor],
        segment_frames: int | None = None,
        segments_per_call: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[torch.FloatTensor]:
        """Decodes the codes of several clips of any lengths, in segments, as the original decodes generated speech.

        Args:
            audio_codes (`list[torch.LongTensor]`): one clip's codes `(num_quantizers, frames)` per clip (the same
                number of quantizers for all).
            segment_frames (`int`, *optional*): code frames per segment (default `DECODE_SEGMENT_FRAMES`, 1500 = 60 s).
            segments_per_call (`int`, *optional*): most segments per `decode` call (default: all in one call).
            progress (`Callable[[int, int], None]`, *optional*): called with `(segments done, segments)` after each
                call.

        Each clip is cut into segments of `segment_frames` frames whose waveforms are concatenated; the segments of
        all clips go through `decode` in padded batches, each decoded as if it were alone.

        Returns:
            `list[torch.FloatTensor]`: each clip's waveform `(samples,)` at `config.sampling_rate`, float32 on the CPU.
        """
        segment_frames = DECODE_SEGMENT_FRAMES if segment_frames is None else segment_frames

        def decode(codes, mask):
            decoded = self.decode(codes.to(self.device), mask.to(self.device))
            return decoded.audio_values[:, 0].float().cpu(), decoded.audio_values_lengths.cpu()

        checked = [
            _check_clip(codes, f"audio_codes[{clip}]", "num_quantizers") for clip, codes in enumerate(audio_codes)
        ]
        return _run_in_segments(checked, segment_frames, segments_per_call, progress, decode)

    @torch.no_grad()
    def streaming_decode(
        self,
        audio_codes: torch.LongTensor,
        audio_codes_mask: torch.Tensor | None = None,
        cache: MiMoAudioTokenizerStreamingCache | None = None,
        is_last_chunk: bool = False,
        left_overlap: int | None = None,
        right_overlap: int | None = None,
    ) -> MiMoAudioTokenizerStreamingDecoderOutput:
        """Decodes codes that arrive chunk by chunk; the returned pieces of each stream concatenate to its audio.

        Each call decodes the stream's kept left context (up to `left_overlap` codes) followed by the new chunk, and
        returns the audio up to `right_overlap` codes before the end (nothing yet while the stream holds at most
        `right_overlap` codes), or up to the end when `is_last_chunk`. This is the original `streaming_decode` with
        `StreamingConfig` defaults (250 / 40 from the config); every stream is decoded as if it were alone.

        Args:
            audio_codes (`torch.LongTensor` of shape `(batch_size, num_quantizers, chunk_length)`): new codes, one row
                per stream.
            audio_codes_mask (`torch.Tensor` of shape `(batch_size, chunk_length)`, *optional*): valid new codes per
                stream (right padded; a stream may have none in a call).
            cache ([`MiMoAudioTokenizerStreamingCache`], *optional*): the `cache` returned by the previous call;
                `None` starts new streams.
            is_last_chunk (`bool`): flush all remaining audio.
            left_overlap, right_overlap (`int`, *optional*): override `config.streaming_left_overlap` /
                `config.streaming_right_overlap` (`left_overlap >= right_overlap >= 0`).
        """
        left_overlap = self.config.streaming_left_overlap if left_overlap is None else left_overlap
        right_overlap = self.config.streaming_right_overlap if right_overlap is None else right_overlap
        if not left_overlap >= right_overlap >= 0:
            raise ValueError(
                f"Streaming needs left_overlap >= right_overlap >= 0, got {left_overlap} and {right_overlap}."
            )
        self._check_codes(audio_codes)
        batch_size, num_quantizers, length = audio_codes.shape
        if batch_size == 0:
            raise ValueError("`audio_codes` has no stream (batch size 0).")
        device = audio_codes.device
        new_lengths = _lengths_from_mask(
            audio_codes_mask, batch_size, length, "audio_codes_mask", device, allow_empty=True
        )
        if cache is None:
            cache = MiMoAudioTokenizerStreamingCache(
                audio_codes=[audio_codes.new_zeros(num_quantizers, 0)] * batch_size,
                processed_lengths=[0] * batch_size,
            )
        if len(cache.audio_codes) != batch_size or len(cache.processed_lengths) != batch_size:
            raise ValueError(f"The cache holds {len(cache.audio_codes)} streams but `audio_codes` has {batch_size}.")
        if any(kept.shape[0] != num_quantizers for kept in cache.audio_codes):
            raise ValueError("The number of quantizers must stay the same across `streaming_decode` calls.")

        inputs = [
            torch.cat([kept.to(device), audio_codes[i, :, : new_lengths[i]]], dim=-1)
            for i, kept in enumerate(cache.audio_codes)
        ]
        input_lengths = torch.tensor([codes.shape[-1] for codes in inputs], device=device)
        if (input_lengths == 0).any():
            raise ValueError("A stream has no codes at all (nothing cached and nothing new).")
        padded = torch.stack([F.pad(codes, (0, int(input_lengths.max()) - codes.shape[-1])) for codes in inputs])
        audio, audio_lengths = self._decode_valid(padded, input_lengths)

        samples_per_code = self.config.samples_per_code
        pieces, next_codes, next_processed = [], [], []
        for i, codes in enumerate(inputs):
            total, start = codes.shape[-1], cache.processed_lengths[i] * samples_per_code
            if is_last_chunk:
                pieces.append(audio[i, start : audio_lengths[i]])
                next_codes.append(codes)
                next_processed.append(total)
            elif total <= right_overlap:
                pieces.append(audio.new_zeros(0))
                next_codes.append(codes)
                next_processed.append(0)
            else:
                end = total - right_overlap
                pieces.append(audio[i, start : end * samples_per_code])
                kept = min(total, left_overlap)
                next_codes.append(codes[:, total - kept :])
                next_processed.append(end - (total - kept))
        piece_lengths = torch.tensor([piece.shape[0] for piece in pieces], device=device)
        audio_values = torch.stack([F.pad(piece, (0, int(piece_lengths.max()) - piece.shape[0])) for piece in pieces])
        return MiMoAudioTokenizerStreamingDecoderOutput(
            audio_values=audio_values.unsqueeze(1),
            audio_values_lengths=piece_lengths,
            cache=MiMoAudioTokenizerStreamingCache(audio_codes=next_codes, processed_lengths=next_processed),
        )

    @auto_docstring
    def forward(
        self,
        input_features: torch.FloatTensor,
        input_features_mask: torch.Tensor | None = None,
        num_quantizers: int | None = None,
        return_dict: bool | None = None,
    ) -> MiMoAudioTokenizerOutput | tuple[torch.Tensor, ...]:
        """
        Encodes and decodes (reconstruction). Shapes as in `encode` and `decode`.

        Args:
            input_features (`torch.FloatTensor` of shape `(batch_size, n_mels, frames)`):
                Natural-log mel frames (100 per second), e.g. from `MiMoAudioFeatureExtractor`.
            input_features_mask (`torch.Tensor` of shape `(batch_size, frames)`, *optional*):
                1 for valid frames, 0 for right padding.
            num_quantizers (`int`, *optional*):
                Number of quantizers to use (defaults to all).
            return_dict (`bool`, *optional*):
                Whether to return a [`MiMoAudioTokenizerOutput`] or, as with Mimi, a plain tuple `(audio_codes,
                audio_codes_mask, audio_values, audio_values_lengths)`. Defaults to `config.return_dict`.

        Returns:
            [`MiMoAudioTokenizerOutput`] (or its tuple): the codes of `encode` and the waveform of `decode`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.encode(input_features, input_features_mask, num_quantizers)
        decoded = self.decode(encoded.audio_codes, encoded.audio_codes_mask)
        output = MiMoAudioTokenizerOutput(
            audio_codes=encoded.audio_codes,
            audio_codes_mask=encoded.audio_codes_mask,
            audio_values=decoded.audio_values,
            audio_values_lengths=decoded.audio_values_lengths,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "MiMoAudioTokenizerModel",
    "MiMoAudioTokenizerPreTrainedModel",
    "MiMoAudioTokenizerEncoderOutput",
    "MiMoAudioTokenizerDecoderOutput",
    "MiMoAudioTokenizerStreamingCache",
    "MiMoAudioTokenizerStreamingDecoderOutput",
    "MiMoAudioTokenizerOutput",
]
