"""MiMo-Audio speech-text language model: patch encoder, Qwen2 backbone, patch decoder."""

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import (
    CONFIG_NAME,
    TransformersKwargs,
    auto_docstring,
    cached_file,
    can_return_tuple,
    logging,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs, recursively_install_hooks

from .configuration_mimo_audio import MiMoAudioConfig
from .conversion_mapping_mimo_audio import HUB_KWARGS, is_original_config_dict
from .generation_mimo_audio import MiMoAudioGenerationMixin
from .quantization_mimo_audio import (
    UNQUANTIZED_MODULES,
    keep_bnb_cpu_4bit_layers_unpacked,
    unpack_bnb_cpu_4bit_weights,
)


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


@dataclass
@auto_docstring
class MiMoAudioOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        The training loss: `(text_loss_weight * text_loss + sum_c audio_loss_weights[c] * audio_loss[c])` divided by
        the sum of the weights, or `text_loss` alone when no position has an audio target.
    text_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Next-position cross-entropy of the text channel, `<|empty|>` targets weighted by `empty_token_loss_weight`.
    audio_loss (`torch.FloatTensor` of shape `(audio_channels,)`, *optional*):
        Per codebook, the teacher-forced patch decoder cross-entropy summed and divided by `patches * group_size`.
        `None` when no position has an audio target.
    logits (`torch.FloatTensor` of shape `(batch_size, kept_positions, vocab_size)`):
        Text logits for the kept positions (see `logits_to_keep`).
    audio_logits (`tuple(torch.FloatTensor)`, *optional*):
        One tensor per codebook `c` of shape `(num_patches, group_size, audio_vocab_sizes[c])`: teacher-forced patch
        decoder logits for the patches that carry an audio target, in row-major (batch, position) order.
    cache (`Cache`, *optional*):
        The backbone's key/value cache.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Backbone hidden states (embedding output and each layer), when `output_hidden_states=True`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Backbone attention weights, when `output_attentions=True`.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, kept_positions, hidden_size)`):
        The backbone's output after its final norm, for the kept positions. Feed it to
        [`MiMoAudioForConditionalGeneration.get_patch_decoder_inputs`] to start a patch.
    patch_encoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Patch encoder hidden states, when `output_hidden_states=True`: see [`MiMoAudioModelOutputWithPast`].
    patch_encoder_attentions (`tuple(torch.FloatTensor)`, *optional*):
        Patch encoder attention weights, when `output_attentions=True`: see [`MiMoAudioModelOutputWithPast`].
    patch_decoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        When `output_hidden_states=True` and `audio_labels` is given: each layer's output (the last one before the
        final norm) of the teacher-forced patch decoder, each of shape
        `(num_patches, patch_decoder_steps, patch_decoder_hidden_size)`; empty when no position has an audio target.
    patch_decoder_attentions (`tuple(torch.FloatTensor)`, *optional*):
        When `output_attentions=True` and `audio_labels` is given: the teacher-forced patch decoder's attention
        weights, one per layer, each of shape `(num_patches, patch_decoder_heads, patch_decoder_steps,
        patch_decoder_steps)` (with an attention implementation that returns them, e.g. `eager`); empty when no
        position has an audio target.
    """

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    audio_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    audio_logits: tuple[torch.FloatTensor, ...] | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    last_hidden_state: torch.FloatTensor | None = None
    patch_encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    patch_encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    patch_decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    patch_decoder_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
@auto_docstring
class MiMoAudioModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`):
        The backbone's output after its final norm.
    cache (`Cache`, *optional*):
        The backbone's key/value cache.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Backbone hidden states (embedding output and each layer), when `output_hidden_states=True`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Backbone attention weights, when `output_attentions=True`.
    patch_encoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        When `output_hidden_states=True`: each patch encoder layer's output (the last one before the final norm), each
        of shape `(num_patches, group_size, patch_encoder_hidden_size)`, the patches of the audio positions in
        row-major (batch, position) order; empty when the input has no audio position.
    patch_encoder_attentions (`tuple(torch.FloatTensor)`, *optional*):
        When `output_attentions=True`: the patch encoder's attention weights, one per layer, each of shape
        `(num_patches, patch_encoder_heads, group_size, group_size)` (with an attention implementation that returns
        them, e.g. `eager`); empty when the input has no audio position.
    """

    patch_encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    patch_encoder_attentions: tuple[torch.FloatTensor, ...] | None = None


# Guards the first installation of the patch transformers' recording hooks (see `capture_patch_outputs`).
_patch_hooks_lock = threading.Lock()


def capture_patch_outputs(submodule: str, only_with: str | None = None):
    """
    `capture_outputs` for the patch transformer held in the model's attribute `submodule` (`"patch_encoder"` or
    `"patch_decoder"`): its outputs are recorded under the model's `_can_record_outputs` keys `{submodule}_attentions`
    and `{submodule}_hidden_states`, apart from the backbone's `attentions` / `hidden_states`, and the usual
    `output_attentions` / `output_hidden_states` (argument or config) request them, as `output_attentions` requests
    SAM's `mask_decoder_attentions`; with `only_with`, only when that keyword argument is given (the input that makes
    the forward run `submodule`). The recording hooks are installed on `submodule` alone, at the first request: the
    backbone (a model of its own) installs its own, so no module is hooked twice, whatever the order of the calls.
    Without a request the forward runs as under `can_return_tuple`, and installed hooks return at once.
    """
    flags = {f"output_{submodule}_{kind}": f"output_{kind}" for kind in ("attentions", "hidden_states")}

    def decorator(forward):
        @wraps(forward)
        def forward_without_flags(self, *args, **kwargs):
            for flag in flags:
                kwargs.pop(flag)
            return forward(self, *args, **kwargs)

        recording_forward = capture_outputs(forward_without_flags)
        plain_forward = can_return_tuple(forward)

        @wraps(forward)
        def wrapper(self, *args, **kwargs):
            runs = only_with is None or kwargs.get(only_with) is not None
            requested = {
                flag: runs and bool(kwargs.get(requested_by, getattr(self.config, requested_by, False)))
                for flag, requested_by in flags.items()
            }
            if not any(requested.values()):
                return plain_forward(self, *args, **kwargs)
            if not getattr(self, "_output_capturing_hooks_installed", False):
                with _patch_hooks_lock:
                    if not getattr(self, "_output_capturing_hooks_installed", False):
                        recursively_install_hooks(
                            getattr(self, submodule), f".{submodule}", list(self._can_record_outputs.items())
                        )
                        self._output_capturing_hooks_installed = True
            return recording_forward(self, *args, **kwargs, **requested)

        return wrapper

    return decorator


@auto_docstring
class MiMoAudioPreTrainedModel(PreTrainedModel):
    config: MiMoAudioConfig
    base_model_prefix = "model"
    input_modalities = ("audio", "text")
    output_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "MiMoAudioPatchEncoderLayer", "MiMoAudioPatchDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # Keys of an original checkpoint that loading this class leaves out on purpose (see `from_pretrained`).
    _ignored_prefixes_on_load: tuple[str, ...] = ()

    def _set_patch_attn_implementation(self):
        """The patch transformers are plain modules: give their configs the model's attention implementation."""
        for sub_config in (self.config.patch_encoder_config, self.config.patch_decoder_config):
            if sub_config._attn_implementation is None:
                sub_config._attn_implementation_internal = self.config._attn_implementation

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """
        Saves in this package's layout (`model.language_model.*`, `patch_decoder.*`, ...), not the original's. The
        generation config is written as a standalone one, so its `audio_*` sampling keys survive the reload. 4-bit
        weights that bitsandbytes repacked for its CPU kernel are unpacked first (`unpack_bnb_cpu_4bit_weights`).
        """
        if self.can_generate():
            self.generation_config._from_model_config = False
        unpack_bnb_cpu_4bit_weights(self)
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        Loads a checkpoint in this package's layout or in the original MiMo-Audio layout (flat Qwen2 config and
        `speech_embeddings.*`, `local_transformer.*`, ... keys, translated on load).

        This package's layout follows Transformers: missing weights are initialised and reported with unexpected ones
        (a warning, and `output_loading_info=True`), so a base-model checkpoint loads into the head class and vice
        versa. Loading an original checkpoint is a conversion: there, a missing, unexpected or mis-shaped tensor
        raises a `ValueError`.

        Generation settings come from the checkpoint's `generation_config.json`, as for any model: a converted
        checkpoint stores `default_generation_config` (the original's sampling and the dict output with
        `audio_sequences`). An original checkpoint stores no MiMo-Audio settings: it keeps Transformers' sampling
        defaults and returns the dict output, as a converted one does.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        if unpacked := keep_bnb_cpu_4bit_layers_unpacked(model):
            logger.warning(
                f"{len(unpacked)} 4-bit layer(s) have widths bitsandbytes' packed CPU kernel does not support; they "
                f"use its generic 4-bit path on CPU: {unpacked}"
            )
        hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}
        if _is_original_checkpoint(pretrained_model_name_or_path, hub_kwargs):
            if model.can_generate():
                # returns `audio_sequences`, as a converted checkpoint does (its stored `default_generation_config`)
                model.generation_config.return_dict_in_generate = True
            loading_info["unexpected_keys"] = {
                key
                for key in loading_info.get("unexpected_keys") or []
                if not key.startswith(cls._ignored_prefixes_on_load)
            }
            problems = {
                kind: sorted(loading_info.get(kind) or [])
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if loading_info.get(kind)
            }
            if problems:
                raise ValueError(
                    f"Original checkpoint {pretrained_model_name_or_path} does not match {cls.__name__}: {problems}"
                )
        return (model, loading_info) if output_loading_info else model


def _is_original_checkpoint(pretrained_model_name_or_path, hub_kwargs: dict) -> bool:
    """Whether the checkpoint's `config.json` is the flat config of an original MiMo-Audio checkpoint."""
    config_file = cached_file(
        pretrained_model_name_or_path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs
    )
    if config_file is None:
        return False
    with open(config_file) as file:
        return is_original_config_dict(json.load(file))


class MiMoAudioPatchEncoderLayer(Qwen2DecoderLayer):
    """
    A Qwen2 decoder layer of the patch encoder: a class of its own, so that output recording tells its outputs from
    the backbone's and the patch decoder's.
    """


def _rms_norm(norm: Qwen2RMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    """`norm(hidden_states)` without the module call: the operations of `Qwen2RMSNorm.forward`."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * hidden_states.to(input_dtype)


class MiMoAudioPatchDecoderLayer(Qwen2DecoderLayer):
    """
    A Qwen2 decoder layer of the patch decoder: a class of its own, so that output recording tells its outputs from
    the backbone's and the patch encoder's, and so that generation can run it through `decode_step`.
    """

    def decode_step(
        self,
        hidden_states: torch.Tensor,
        cache: Cache,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_function: Callable,
    ) -> torch.Tensor:
        """
        One generation step: the operations of `forward` (projections through their modules, so adapters and
        quantized layers apply) without the per-call wrappers of the layer,
        attention and norm modules, which cost as much as the arithmetic at the patch decoder's widths (16 % of an
        eager batch-1 patch). No output recording, gradient checkpointing or dropout: generation only.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, 1, hidden_size)`): the step's input.
            cache (`Cache`): the patch's key/value cache, updated in place.
            attention_mask (`torch.Tensor`, *optional*): the step's mask row in the attention implementation's
                format, or `None` where the cache holds exactly the positions the step attends to.
            position_embeddings (`tuple(torch.Tensor, torch.Tensor)`): the step's rotary `(cos, sin)`.
            attention_function (`Callable`): an attention implementation of `ALL_ATTENTION_FUNCTIONS`.

        Returns:
            `torch.Tensor` of shape `(batch_size, 1, hidden_size)`.
        """
        attention = self.self_attn
        normed = _rms_norm(self.input_layernorm, hidden_states)
        hidden_shape = (*normed.shape[:-1], -1, attention.head_dim)
        query = attention.q_proj(normed).view(hidden_shape).transpose(1, 2)
        key = attention.k_proj(normed).view(hidden_shape).transpose(1, 2)
        value = attention.v_proj(normed).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        key, value = cache.update(key, value, attention.layer_idx)
        attended, _ = attention_function(
            attention,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=attention.scaling,
            sliding_window=attention.sliding_window,
        )
        hidden_states = hidden_states + attention.o_proj(attended.reshape(*normed.shape[:-1], -1))
        normed = _rms_norm(self.post_attention_layernorm, hidden_states)
        mlp = self.mlp
        return hidden_states + mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))


class MiMoAudioPatchEncoder(nn.Module):
    """
    Turns the `group_size` frame embeddings of each audio patch into one backbone input vector: Qwen2 decoder layers
    inside each patch (bidirectional when `config.input_full_attention`, else causal), a final norm, then `proj` over
    the concatenated frames.
    """

    def __init__(self, config: MiMoAudioConfig):
        super().__init__()
        encoder_config = config.patch_encoder_config
        self.config = encoder_config
        self.layers = nn.ModuleList(
            [
                MiMoAudioPatchEncoderLayer(encoder_config, layer_idx)
                for layer_idx in range(encoder_config.num_hidden_layers)
            ]
        )
        self.norm = Qwen2RMSNorm(encoder_config.hidden_size, eps=encoder_config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=encoder_config)
        self.proj = nn.Linear(
            encoder_config.hidden_size * config.group_size, config.text_config.hidden_size, bias=False
        )

    def forward(self, patch_embeds: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """
        Args:
            patch_embeds (`torch.Tensor` of shape `(num_patches, group_size, patch_encoder_hidden_size)`):
                Summed codebook embeddings of each frame.
            is_causal (`bool`):
                Causal attention inside a patch instead of bidirectional.

        Returns:
            `torch.Tensor` of shape `(num_patches, hidden_size)`: one backbone input per patch.
        """
        num_patches, group_size, _ = patch_embeds.shape
        position_ids = torch.arange(group_size, device=patch_embeds.device).unsqueeze(0)
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": patch_embeds,
            "attention_mask": None,
            "cache": None,
            "position_ids": position_ids,
        }
        attention_mask = create_causal_mask(**mask_kwargs) if is_causal else create_bidirectional_mask(**mask_kwargs)
        position_embeddings = self.rotary_emb(patch_embeds, position_ids)
        hidden_states = patch_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                is_causal=is_causal,
            )
        hidden_states = self.norm(hidden_states)
        return self.proj(hidden_states.reshape(num_patches, -1))


class MiMoAudioPatchDecoder(nn.Module):
    """
    Causal Qwen2 decoder layers that produce one audio patch, position by position, with one output head per codebook.
    Position 0 is `input_proj(backbone hidden state)`; the following positions are summed codebook embeddings (through
    `embeddings_proj` when the embedding width differs from the decoder width), laid out with the delay pattern.
    """

    def __init__(self, config: MiMoAudioConfig):
        super().__init__()
        decoder_config = config.patch_decoder_config
        embedding_dim = config.patch_encoder_config.hidden_size
        self.config = decoder_config
        self.input_proj = nn.Linear(config.text_config.hidden_size, decoder_config.hidden_size, bias=False)
        self.embeddings_proj = (
            nn.Linear(embedding_dim, decoder_config.hidden_size, bias=False)
            if embedding_dim != decoder_config.hidden_size
            else None
        )
        self.layers = nn.ModuleList(
            [
                MiMoAudioPatchDecoderLayer(decoder_config, layer_idx)
                for layer_idx in range(decoder_config.num_hidden_layers)
            ]
        )
        self.norm = Qwen2RMSNorm(decoder_config.hidden_size, eps=decoder_config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=decoder_config)
        self.heads = nn.ModuleList(
            [nn.Linear(decoder_config.hidden_size, size, bias=False) for size in config.audio_vocab_sizes]
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """
        Runs the decoder layers causally over `inputs_embeds`, continuing from `cache` when given.

        Args:
            inputs_embeds (`torch.Tensor` of shape `(batch_size, steps, patch_decoder_hidden_size)`):
                Decoder inputs: `input_proj` of a backbone hidden state first, then code embeddings.
            cache (`Cache`, *optional*):
                Key/value cache of the earlier steps of this patch (`DynamicCache(config=config.patch_decoder_config)`
                or a `StaticCache` reset before each patch). Updated in place.
            position_ids (`torch.LongTensor` of shape `(batch_size, steps)`, *optional*):
                Defaults to the steps after the cached ones.
            attention_mask (`torch.Tensor`, *optional*):
                With `position_embeddings`: the prepared 4D mask in the format of the attention implementation (see
                `create_causal_mask`), e.g. one row of a mask built once per `generate` call, or `None` where no mask
                is needed (one step over a cache that holds exactly the earlier steps). Without
                `position_embeddings`, the causal mask after the cached steps is built here.
            position_embeddings (`tuple(torch.Tensor, torch.Tensor)`, *optional*):
                Prepared rotary `(cos, sin)` of `position_ids`, each `(1, steps, head_dim)`. Computed when omitted.

        Returns:
            `torch.Tensor` of shape `(batch_size, steps, patch_decoder_hidden_size)`: outputs after the final norm;
            `heads[c]` gives codebook `c`'s logits.
        """
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)
        if position_embeddings is None:  # not prepared by the caller: the mask is built here too
            attention_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=None,
                cache=cache,
                position_ids=position_ids,
            )
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return self.norm(hidden_states)

    def decode_step(
        self,
        inputs_embeds: torch.Tensor,
        cache: Cache,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attn_implementation: str,
    ) -> torch.Tensor:
        """
        One step of patch generation: `forward` for one position with everything prepared (see
        `MiMoAudioPatchDecoderLayer.decode_step`), the same operations in the same order.

        Args:
            inputs_embeds (`torch.Tensor` of shape `(batch_size, 1, patch_decoder_hidden_size)`): the step's input.
            cache (`Cache`): the patch's key/value cache, updated in place.
            attention_mask (`torch.Tensor`, *optional*): the step's mask row, as in `forward`.
            position_embeddings (`tuple(torch.Tensor, torch.Tensor)`): the step's rotary `(cos, sin)`.
            attn_implementation (`str`): the attention implementation, the one `attention_mask` is made for (the
                config's, or another one for the step, see `_prepare_patch_decoding`).

        Returns:
            `torch.Tensor` of shape `(batch_size, 1, patch_decoder_hidden_size)`: the output after the final norm.
        """
        attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer.decode_step(
                hidden_states, cache, attention_mask, position_embeddings, attention_function
            )
        return _rms_norm(self.norm, hidden_states)


@auto_docstring(
    custom_intro="""
    The Qwen2 backbone (`language_model`) with MiMo-Audio's input side: per-codebook `audio_embeddings` (shared with
    the patch decoder) and the `patch_encoder`. Returns the backbone's hidden states.
    """
)
class MiMoAudioModel(MiMoAudioPreTrainedModel):
    # Loading it from a full original checkpoint leaves out the heads.
    _ignored_prefixes_on_load = ("lm_head.", "patch_decoder.")
    # The patch encoder's outputs (see `capture_patch_outputs`); the backbone records its own.
    _can_record_outputs = {
        "patch_encoder_hidden_states": OutputRecorder(MiMoAudioPatchEncoderLayer),
        "patch_encoder_attentions": OutputRecorder(Qwen2Attention, index=1, layer_name="patch_encoder"),
    }

    def __init__(self, config: MiMoAudioConfig):
        super().__init__(config)
        self._set_patch_attn_implementation()
        self.language_model = AutoModel.from_config(config.text_config)
        self.audio_embeddings = nn.ModuleList(
            [
                nn.Embedding(size, config.patch_encoder_config.hidden_size, padding_idx=empty_id)
                for size, empty_id in zip(config.audio_vocab_sizes, config.audio_empty_ids)
            ]
        )
        self.patch_encoder = MiMoAudioPatchEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _check_codes(self, audio_codes: torch.Tensor, name: str):
        """Raises a ValueError when a code lies outside its codebook. `audio_codes`: `(..., audio_channels)`."""
        sizes = torch.tensor(self.config.audio_vocab_sizes, device=audio_codes.device)
        if audio_codes.numel() and ((audio_codes < 0) | (audio_codes >= sizes)).any():
            raise ValueError(
                f"`{name}` holds codes outside the codebooks (sizes {self.config.audio_vocab_sizes}) "
                "at audio positions."
            )

    def embed_audio_frames(self, audio_codes: torch.Tensor) -> torch.Tensor:
        """
        Sums the codebook embeddings of each frame for the patch encoder; a codebook's empty id contributes zero.

        Args:
            audio_codes (`torch.LongTensor` of shape `(..., audio_channels)`): codes of each frame.

        Returns:
            `torch.Tensor` of shape `(..., patch_encoder_hidden_size)`, in the embeddings' dtype.
        """
        embeds = None
        for channel, (table, empty_id) in enumerate(zip(self.audio_embeddings, self.config.audio_empty_ids)):
            codes = audio_codes[..., channel]
            channel_embeds = table(codes)  # tables may sit on different devices under `device_map`
            is_empty = (codes == empty_id).unsqueeze(-1).to(channel_embeds.device)
            channel_embeds = channel_embeds.masked_fill(is_empty, 0.0)
            embeds = channel_embeds if embeds is None else embeds + channel_embeds.to(embeds.device)
        return embeds

    def get_inputs_embeds(
        self, input_ids: torch.LongTensor, audio_input_ids: torch.LongTensor | None = None
    ) -> torch.Tensor:
        """
        Builds the backbone inputs: the text embedding (zero at `<|empty|>` positions) plus, at `<|empty|>` positions,
        the patch encoder output of that position's audio patch.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): text channel.
            audio_input_ids (`torch.LongTensor` of shape `(batch_size, seq_len, group_size, audio_channels)`):
                audio codes aligned with `input_ids`; only read at `<|empty|>` positions. Needed when `input_ids`
                contains `<|empty|>`.

        Returns:
            `torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch_size, seq_len), got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] == 0:
            raise ValueError("`input_ids` is empty (seq_len 0): give at least one position.")
        vocab_size = self.config.text_config.vocab_size
        if ((input_ids < 0) | (input_ids >= vocab_size)).any():
            raise ValueError(
                f"`input_ids` holds ids outside the text vocabulary [0, {vocab_size}): min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}."
            )
        is_audio = input_ids == self.config.empty_token_id
        text_embeds = self.get_input_embeddings()(input_ids)
        text_embeds = text_embeds.masked_fill(is_audio.unsqueeze(-1).to(text_embeds.device), 0.0)
        if audio_input_ids is None:
            if is_audio.any():
                raise ValueError(
                    f"`input_ids` has audio positions (`<|empty|>`, id {self.config.empty_token_id}) but "
                    "`audio_input_ids` is None."
                )
            return text_embeds
        expected = (*input_ids.shape, self.config.group_size, self.config.audio_channels)
        if tuple(audio_input_ids.shape) != expected:
            raise ValueError(
                f"`audio_input_ids` must have shape (batch_size, seq_len, group_size, audio_channels) = {expected}, "
                f"got {tuple(audio_input_ids.shape)}."
            )
        patch_codes = audio_input_ids[is_audio]  # (num_patches, group_size, audio_channels)
        self._check_codes(patch_codes, "audio_input_ids")
        if patch_codes.shape[0] == 0:
            return text_embeds
        patch_embeds = self.patch_encoder(
            self.embed_audio_frames(patch_codes), is_causal=not self.config.input_full_attention
        )
        audio_embeds = torch.zeros_like(text_embeds)
        audio_embeds[is_audio.to(audio_embeds.device)] = patch_embeds.to(audio_embeds.device, audio_embeds.dtype)
        return text_embeds + audio_embeds

    def get_decode_inputs_embeds(self, input_ids: torch.LongTensor, audio_input_ids: torch.LongTensor) -> torch.Tensor:
        """
        The backbone inputs of generated positions, with static shapes and no host synchronisation (for a compiled
        or captured decode step): the patch encoder runs on the patch of every position and its output is kept where
        the text is `<|empty|>`, the text embedding elsewhere. Equal to `get_inputs_embeds`, without its code check
        (generation only emits valid codes).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): text channel.
            audio_input_ids (`torch.LongTensor` of shape `(batch_size, seq_len, group_size, audio_channels)`).

        Returns:
            `torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`.
        """
        text_embeds = self.get_input_embeddings()(input_ids)
        patches = audio_input_ids.reshape(-1, self.config.group_size, self.config.audio_channels)
        patch_embeds = self.patch_encoder(
            self.embed_audio_frames(patches), is_causal=not self.config.input_full_attention
        ).reshape(text_embeds.shape)
        is_audio = (input_ids == self.config.empty_token_id).unsqueeze(-1).to(text_embeds.device)
        return torch.where(is_audio, patch_embeds.to(text_embeds.device, text_embeds.dtype), text_embeds)

    @capture_patch_outputs("patch_encoder")
    @auto_docstring
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        audio_input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MiMoAudioModelOutputWithPast:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Text channel, one id per backbone position; audio positions hold `<|empty|>`.
            audio_input_ids (`torch.LongTensor` of shape `(batch_size, seq_len, group_size, audio_channels)`):
                Audio codes aligned with `input_ids` (each codebook's empty id where there is no audio).
            attention_mask (`torch.Tensor` of shape `(batch_size, past_len + seq_len)`, *optional*):
                1 for real positions, 0 for padding.
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Defaults to the count of real positions before each one (`attention_mask.cumsum(-1) - 1`), so left
                padding does not shift positions, or to `arange` after the cached length without a mask.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`, *optional*):
                Precomputed backbone inputs (see `get_inputs_embeds`), instead of `input_ids`/`audio_input_ids`.

        Returns:
            [`MiMoAudioModelOutputWithPast`]: `last_hidden_state` `(batch_size, seq_len, hidden_size)` after the final
            norm.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_inputs_embeds(input_ids, audio_input_ids)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            batch_size, seq_len = inputs_embeds.shape[:2]
            if cache is not None and cache.is_compileable:
                # a static cache's mask covers the positions seen so far or the whole cache (no host sync here)
                max_length = cache.get_max_length()
                if attention_mask.shape[0] != batch_size or not seq_len <= attention_mask.shape[1] <= max_length:
                    raise ValueError(
                        f"`attention_mask` must have shape (batch_size, past_length + seq_len) with batch_size "
                        f"{batch_size} and at most the static cache's {max_length} positions, got "
                        f"{tuple(attention_mask.shape)}."
                    )
            else:
                past_length = cache.get_seq_length() if cache is not None else 0
                expected = (batch_size, past_length + seq_len)
                if tuple(attention_mask.shape) != expected:
                    raise ValueError(
                        f"`attention_mask` must have shape (batch_size, past_length + seq_len) = {expected}, got "
                        f"{tuple(attention_mask.shape)}."
                    )
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return MiMoAudioModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@auto_docstring(
    custom_intro="""
    MiMo-Audio: the backbone ([`MiMoAudioModel`]) with the text head `lm_head` and the `patch_decoder` that writes
    one `group_size x audio_channels` audio patch whenever the text channel is `<|empty|>`.
    """
)
class MiMoAudioForConditionalGeneration(MiMoAudioPreTrainedModel, MiMoAudioGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Sharded like the embeddings it may be tied to (as Qwen2ForCausalLM's head).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # Left unquantized by bitsandbytes / torchao (only the LLM's linear layers are quantized; `lm_head` is skipped by
    # Transformers' default) and kept in fp32 when loading in fp16. Measurements: docs/quantization.md.
    _keep_in_fp32_modules = list(UNQUANTIZED_MODULES)
    # The loss is the official recipe's own mean (weighted text tokens, patches per codebook), not a sum over
    # `num_items_in_batch`: the `Trainer` must divide it by the gradient accumulation steps and must not multiply it by
    # the number of processes (which it does for models that take loss kwargs).
    accepts_loss_kwargs = False
    # The teacher-forced patch decoder's outputs (see `capture_patch_outputs`); `model` records the others.
    _can_record_outputs = {
        "patch_decoder_hidden_states": OutputRecorder(MiMoAudioPatchDecoderLayer),
        "patch_decoder_attentions": OutputRecorder(Qwen2Attention, index=1, layer_name="patch_decoder"),
    }

    def __init__(self, config: MiMoAudioConfig):
        super().__init__(config)
        self._set_patch_attn_implementation()
        self.model = MiMoAudioModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.patch_decoder = MiMoAudioPatchDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    # ----- patch decoder building blocks (shared by the loss and by generation) -----

    def get_patch_decoder_inputs(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """
        First patch decoder input of a patch: `patch_decoder.input_proj` of the backbone hidden state (after its final
        norm) at the position before the patch.

        Args:
            hidden_states (`torch.Tensor` of shape `(..., hidden_size)`).

        Returns:
            `torch.Tensor` of shape `(..., patch_decoder_hidden_size)`.
        """
        # The patch decoder may run in another dtype than the backbone (fp32 when an fp16 model keeps it in fp32).
        return self.patch_decoder.input_proj(hidden_states.to(self.patch_decoder.input_proj.weight.dtype))

    def embed_patch_decoder_codes(
        self,
        audio_codes: torch.LongTensor,
        codebook_mask: torch.BoolTensor | None = None,
        channels: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """
        Patch decoder input for a set of codes: the sum over the active codebooks of the shared `audio_embeddings`,
        each through `patch_decoder.embeddings_proj` when the widths differ (the original's order); zeros where no
        codebook is active. Empty ids are embedded like any other code (the decoder never emits them).

        Args:
            audio_codes (`torch.LongTensor` of shape `(..., audio_channels)`):
                One code per codebook; entries where `codebook_mask` is False are ignored (any value).
            codebook_mask (`torch.BoolTensor` broadcastable to `audio_codes`, *optional*):
                True where a codebook contributes. Defaults to all codebooks.
            channels (`tuple[int, ...]`, *optional*):
                The codebooks that may contribute, when known ahead (a generation step's): the others are skipped
                instead of adding zeros, which gives the same sum. Defaults to all codebooks.

        Returns:
            `torch.Tensor` of shape `(..., patch_decoder_hidden_size)`.
        """
        if audio_codes.shape[-1] != self.config.audio_channels:
            raise ValueError(
                f"`audio_codes` must end with audio_channels={self.config.audio_channels}, "
                f"got {tuple(audio_codes.shape)}."
            )
        if codebook_mask is not None:
            codebook_mask = codebook_mask.expand_as(audio_codes)
        tables = self.model.audio_embeddings
        embeds = None
        for channel in range(len(tables)) if channels is None else channels:
            codes = audio_codes[..., channel]
            if codebook_mask is not None:
                codes = codes.masked_fill(~codebook_mask[..., channel], 0)
            channel_embeds = tables[channel](codes)
            if self.patch_decoder.embeddings_proj is not None:
                channel_embeds = self.patch_decoder.embeddings_proj(channel_embeds)
            if codebook_mask is not None:
                active = codebook_mask[..., channel].unsqueeze(-1)
                channel_embeds = channel_embeds * active.to(channel_embeds.device, channel_embeds.dtype)
            embeds = channel_embeds if embeds is None else embeds + channel_embeds.to(embeds.device)
        if embeds is None:  # no codebook at this step
            hidden_size = self.patch_decoder.input_proj.out_features
            embeds = tables[0].weight.new_zeros((*audio_codes.shape[:-1], hidden_size))
        return embeds

    def get_audio_logits(self, patch_decoder_hidden_states: torch.Tensor, codebook: int) -> torch.Tensor:
        """
        Logits of one codebook from patch decoder outputs.

        Args:
            patch_decoder_hidden_states (`torch.Tensor` of shape `(..., patch_decoder_hidden_size)`):
                output of `patch_decoder(...)`.
            codebook (`int`): codebook index `c`.

        Returns:
            `torch.Tensor` of shape `(..., audio_vocab_sizes[c])`.
        """
        return self.patch_decoder.heads[codebook](patch_decoder_hidden_states)

    def delay_audio_codes(self, audio_codes: torch.LongTensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """
        Lays patches out on the patch decoder's steps: codebook `c`'s frame `f` goes to step `delay_pattern[c] + f`.

        Args:
            audio_codes (`torch.LongTensor` of shape `(num_patches, group_size, audio_channels)`).

        Returns:
            `(delayed_codes, active)`: `delayed_codes` `(num_patches, steps, audio_channels)` with
            `steps = group_size + max(delay_pattern)` (0 where inactive), and `active` `(steps, audio_channels)`,
            True where codebook `c` is produced at that step.
        """
        num_patches, group_size, channels = audio_codes.shape
        steps = self.config.patch_decoder_steps
        delayed = audio_codes.new_zeros((num_patches, steps, channels))
        active = torch.zeros((steps, channels), dtype=torch.bool, device=audio_codes.device)
        for channel, delay in enumerate(self.config.delay_pattern):
            delayed[:, delay : delay + group_size, channel] = audio_codes[:, :, channel]
            active[delay : delay + group_size, channel] = True
        return delayed, active

    def teacher_forced_audio_logits(
        self, hidden_states: torch.Tensor, audio_codes: torch.LongTensor
    ) -> tuple[torch.Tensor, ...]:
        """
        Runs the patch decoder teacher-forced on whole patches, as in training.

        Input steps: `[get_patch_decoder_inputs(h), e_0, ..., e_{steps-2}]` where `e_t` embeds the delayed codes of
        step `t` (`embed_patch_decoder_codes`; codes equal to -100 contribute nothing). Codebook `c`'s logits are read
        at steps `delay_pattern[c] ... delay_pattern[c] + group_size - 1`.

        Args:
            hidden_states (`torch.Tensor` of shape `(num_patches, hidden_size)`):
                Backbone hidden state at the position before each patch.
            audio_codes (`torch.LongTensor` of shape `(num_patches, group_size, audio_channels)`):
                The target patches (-100 allowed for ignored entries).

        Returns:
            Tuple with one tensor per codebook `c` of shape `(num_patches, group_size, audio_vocab_sizes[c])`.
        """
        delayed, active = self.delay_audio_codes(audio_codes)
        codes_mask = active.unsqueeze(0) & (delayed != IGNORE_INDEX)
        code_embeds = self.embed_patch_decoder_codes(delayed[:, :-1], codes_mask[:, :-1])
        first = self.get_patch_decoder_inputs(hidden_states).unsqueeze(1)
        decoder_inputs = torch.cat([first, code_embeds.to(first.dtype)], dim=1)
        decoder_states = self.patch_decoder(decoder_inputs)
        group_size = self.config.group_size
        return tuple(
            self.get_audio_logits(decoder_states[:, delay : delay + group_size], channel)
            for channel, delay in enumerate(self.config.delay_pattern)
        )

    # ----- loss -----

    def _text_loss(self, logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """Next-position CE, `<|empty|>` targets weighted by `empty_token_loss_weight`, divided by the weight sum."""
        targets = labels[:, 1:].to(logits.device)
        shift_logits = logits[:, :-1].float()
        token_loss = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view_as(targets)
        weights = torch.where(targets == self.config.empty_token_id, self.config.empty_token_loss_weight, 1.0)
        weights = weights * (targets != IGNORE_INDEX)
        return (token_loss * weights).sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)

    def _audio_loss(
        self, hidden_states: torch.Tensor, labels: torch.LongTensor, audio_labels: torch.LongTensor
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """Teacher-forced patch decoder CE for every position whose next text label is `<|empty|>`."""
        expected = (*labels.shape, self.config.group_size, self.config.audio_channels)
        if tuple(audio_labels.shape) != expected:
            raise ValueError(
                f"`audio_labels` must have shape (batch_size, seq_len, group_size, audio_channels) = {expected}, "
                f"got {tuple(audio_labels.shape)}."
            )
        labels = labels.to(hidden_states.device)
        next_audio = audio_labels[:, 1:].to(hidden_states.device)
        has_target = (labels[:, 1:] == self.config.empty_token_id) & (next_audio != IGNORE_INDEX).flatten(2).any(-1)
        if not has_target.any():
            return None, None
        targets = next_audio[has_target]  # (num_patches, group_size, audio_channels)
        valid = targets != IGNORE_INDEX
        sizes = torch.tensor(self.config.audio_vocab_sizes, device=targets.device)
        if (valid & ((targets < 0) | (targets >= sizes))).any():
            raise ValueError(
                f"`audio_labels` holds codes outside the codebooks (sizes {self.config.audio_vocab_sizes})."
            )
        audio_logits = self.teacher_forced_audio_logits(hidden_states[:, :-1][has_target], targets)
        count = targets.shape[0] * targets.shape[1]
        losses = torch.stack(
            [
                F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    targets[..., channel].reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                / count
                for channel, logits in enumerate(audio_logits)
            ]
        )
        return losses, audio_logits

    def compute_logprobs(
        self,
        input_ids: torch.LongTensor,
        audio_input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        audio_temperature: float = 1.0,
    ):
        """
        Teacher-forced log-probabilities of the given text tokens and audio codes under the distributions `generate`
        samples from (for RL losses); see [`transformers_mimo.compute_logprobs`], which also accepts PEFT wrappers.
        """
        return compute_logprobs(self, input_ids, audio_input_ids, attention_mask, temperature, audio_temperature)

    @capture_patch_outputs("patch_decoder", only_with="audio_labels")
    @auto_docstring
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        audio_input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        audio_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MiMoAudioOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Text channel, one id per backbone position; audio positions hold `<|empty|>` (`config.empty_token_id`).
            audio_input_ids (`torch.LongTensor` of shape `(batch_size, seq_len, group_size, audio_channels)`):
                Audio codes aligned with `input_ids`; each codebook's empty id where there is no audio. Optional for
                text-only input.
            attention_mask (`torch.Tensor` of shape `(batch_size, past_len + seq_len)`, *optional*):
                1 for real positions, 0 for (left) padding.
            position_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Defaults to positions counted over real tokens (see [`MiMoAudioModel.forward`]).
            cache (`Cache`, *optional*):
                Backbone key/value cache.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`, *optional*):
                Backbone inputs instead of `input_ids`/`audio_input_ids`.
            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Text targets, unshifted (the model shifts them); -100 is ignored.
            audio_labels (`torch.LongTensor` of shape `(batch_size, seq_len, group_size, audio_channels)`, *optional*):
                Audio targets, unshifted, -100 ignored. The patch at position `t + 1` is trained from the hidden state
                at `t` wherever `labels[:, t + 1]` is `<|empty|>`. Requires `labels`.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute text logits (and return `last_hidden_state`) only for these positions (0: all). Must be 0
                when `labels` is given.

        Returns:
            [`MiMoAudioOutputWithPast`].
        """
        if audio_labels is not None and labels is None:
            raise ValueError(
                "`audio_labels` needs `labels`: audio targets are selected where the next text label is <|empty|>."
            )
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("Computing the loss needs the logits of every position: pass `logits_to_keep=0`.")
        outputs = self.model(
            input_ids=input_ids,
            audio_input_ids=audio_input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        kept_hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        logits = self.lm_head(kept_hidden_states)

        loss = text_loss = audio_loss = audio_logits = None
        if labels is not None:
            if labels.shape != hidden_states.shape[:2]:
                raise ValueError(
                    f"`labels` must have shape {tuple(hidden_states.shape[:2])}, got {tuple(labels.shape)}."
                )
            text_loss = self._text_loss(logits, labels)
            loss = text_loss
            if audio_labels is not None:
                audio_loss, audio_logits = self._audio_loss(hidden_states, labels, audio_labels)
            if audio_loss is not None:
                weights = torch.tensor(
                    self.config.audio_loss_weights, device=audio_loss.device, dtype=audio_loss.dtype
                )
                total_weight = self.config.text_loss_weight + sum(self.config.audio_loss_weights)
                loss = (self.config.text_loss_weight * text_loss + (weights * audio_loss).sum()) / total_weight

        return MiMoAudioOutputWithPast(
            loss=loss,
            text_loss=text_loss,
            audio_loss=audio_loss,
            logits=logits,
            audio_logits=audio_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            last_hidden_state=kept_hidden_states,
            patch_encoder_hidden_states=outputs.patch_encoder_hidden_states,
            patch_encoder_attentions=outputs.patch_encoder_attentions,
        )


@dataclass
class MiMoAudioLogProbs(ModelOutput):
    r"""
    Teacher-forced log-probabilities of a sequence under the model (see [`compute_logprobs`]).

    Args:
        text_logprobs (`torch.FloatTensor` of shape `(batch_size, seq_len)`):
            Entry `t` is `log p(input_ids[:, t] | positions < t)`; 0 at `t = 0` and at padding.
        audio_logprobs (`torch.FloatTensor` of shape `(batch_size, seq_len, group_size, audio_channels)`):
            Entry `(t, f, c)` is the log-probability of code `audio_input_ids[:, t, f, c]` at the patch decoder step
            `f + delay_pattern[c]`, given the hidden state at `t - 1` and the codes of the earlier steps, with each
            codebook's empty id banned as in generation. Defined where `audio_mask` is True, 0 elsewhere.
        audio_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`):
            True at audio positions (`input_ids == <|empty|>`, not padding, `t >= 1`).
        text_entropy (`torch.FloatTensor` of shape `(batch_size, seq_len)`, *optional*, returned with
            `return_entropy=True`):
            Entry `t` is the entropy of the text distribution that `input_ids[:, t]` was drawn from (after the
            temperature); 0 at `t = 0` and at padding.
    """

    text_logprobs: torch.FloatTensor | None = None
    audio_logprobs: torch.FloatTensor | None = None
    audio_mask: torch.BoolTensor | None = None
    text_entropy: torch.FloatTensor | None = None


def compute_logprobs(
    model,
    input_ids: torch.LongTensor,
    audio_input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    audio_temperature: float = 1.0,
    return_entropy: bool = False,
) -> MiMoAudioLogProbs:
    r"""
    Per-position log-probabilities of the given text tokens and audio codes, teacher-forced in one forward pass: the
    distributions `generate(do_sample=True, temperature=temperature, audio_temperature=audio_temperature)` samples
    from when no top-k / top-p / other logits processor is active (empty ids banned for audio). Gradients flow (use it
    for policy-gradient losses); call `model.eval()` first to match generation exactly (the patch decoder has dropout).

    Args:
        model ([`MiMoAudioForConditionalGeneration`] or a PEFT model wrapping one).
        input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): prompt + completion, text channel.
        audio_input_ids (`torch.LongTensor` of shape `(batch_size, seq_len, group_size, audio_channels)`, *optional*):
            aligned audio channel (e.g. `generate(...).audio_sequences`). Needed when `input_ids` holds `<|empty|>`.
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): 0 at padding (left or right).
        temperature, audio_temperature (`float`, defaults to 1.0): divide the text / audio logits first.
        return_entropy (`bool`, defaults to `False`): also return `text_entropy`.

    Returns:
        [`MiMoAudioLogProbs`]; select the completion with your own mask (e.g. positions `>= prompt_length`).
    """
    if temperature <= 0 or audio_temperature <= 0:
        raise ValueError(f"Temperatures must be positive, got {temperature} and {audio_temperature}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch_size, seq_len), got {tuple(input_ids.shape)}.")
    # Under DDP, the forward goes through the wrapper (which arms the gradient all-reduce); the patch decoder, called
    # afterwards, is reached on the wrapped module.
    core = getattr(model, "module", model)
    config = core.config
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()
    outputs = model(
        input_ids=input_ids, audio_input_ids=audio_input_ids, attention_mask=attention_mask, use_cache=False
    )

    logits = outputs.logits[:, :-1].float() / temperature
    log_probs = logits.log_softmax(-1)
    text = log_probs.gather(-1, input_ids[:, 1:, None].to(logits.device)).squeeze(-1)
    text_logprobs = F.pad(text, (1, 0)).masked_fill(~valid.to(text.device), 0.0)
    text_entropy = None
    if return_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        text_entropy = F.pad(entropy, (1, 0)).masked_fill(~valid.to(entropy.device), 0.0)

    batch_size, seq_len = input_ids.shape
    hidden_states = outputs.last_hidden_state
    audio_logprobs = hidden_states.new_zeros(
        (batch_size, seq_len, config.group_size, config.audio_channels), dtype=torch.float32
    )
    audio_mask = torch.zeros_like(valid)
    audio_mask[:, 1:] = (input_ids[:, 1:] == config.empty_token_id) & valid[:, 1:]
    if not audio_mask.any():
        # No audio position: the patch decoder still runs, on one dummy patch whose result is multiplied by 0, so that
        # its parameters take part in every backward pass (DDP expects the same parameters to get gradients at every
        # step; here they are used after the wrapper's forward).
        dummy = torch.zeros(
            (1, config.group_size, config.audio_channels), dtype=torch.long, device=hidden_states.device
        )
        unused = core.teacher_forced_audio_logits(hidden_states[:1, 0], dummy)
        audio_logprobs = audio_logprobs + 0.0 * sum(logits.sum() for logits in unused).float()
    else:
        if audio_input_ids is None:
            raise ValueError("`input_ids` hold audio positions (<|empty|>): pass their codes in `audio_input_ids`.")
        targets = audio_input_ids[audio_mask].to(hidden_states.device)  # (num_patches, group_size, audio_channels)
        previous = audio_mask[:, 1:].to(hidden_states.device)
        channel_logits = core.teacher_forced_audio_logits(hidden_states[:, :-1][previous], targets)
        patch_logprobs = []
        for channel, channel_logit in enumerate(channel_logits):
            scores = channel_logit.float() / audio_temperature
            scores[..., config.audio_empty_ids[channel]] = float("-inf")
            patch_logprobs.append(scores.log_softmax(-1).gather(-1, targets[..., channel, None]).squeeze(-1))
        audio_logprobs = audio_logprobs.index_put(
            (audio_mask.to(hidden_states.device),), torch.stack(patch_logprobs, -1)
        )
    return MiMoAudioLogProbs(
        text_logprobs=text_logprobs, audio_logprobs=audio_logprobs, audio_mask=audio_mask, text_entropy=text_entropy
    )


__all__ = [
    "MiMoAudioPreTrainedModel",
    "MiMoAudioModel",
    "MiMoAudioForConditionalGeneration",
    "MiMoAudioOutputWithPast",
    "MiMoAudioModelOutputWithPast",
    "MiMoAudioLogProbs",
    "compute_logprobs",
]
