"""Patch-level generation for MiMo-Audio.

Each generation step adds one LLM position to every sample of the batch:

1. the LLM predicts the text token of the new position (the usual logits processors, warpers and stopping criteria of
   Transformers apply to this text channel);
2. if that token is `<|empty|>`, the patch decoder generates the position's audio patch of `group_size` frames x
   `audio_channels` codebooks, one decoder step per slot of the delay pattern (`group_size + max(delay_pattern)`
   steps, each codebook's empty id banned); any other text token gets an all-empty patch.

Every sample decides text or audio for itself, so a batch gives the same result as its samples one by one (the
original checked only the first sample). Greedy decoding reproduces the original exactly, including its min-length
rule (stop ids banned while fewer than `min_new_tokens` positions were generated). Under sampling, banned ids (stop ids
before `min_new_tokens`, each codebook's empty id) are removed before temperature / top-k / top-p, as Transformers
orders its processors; the original removed them afterwards, so its top-k could keep fewer than k candidates.
`original_sampling_order=True` (a generation config key) bans them afterwards, as the original does.

One function, `_generate_audio_patch`, produces a whole patch (all its decoder steps, sampling and empty-id bans
included) without host synchronisation, from a cache, positions and rotary tables prepared once per `generate` call.
With a static LLM cache (`cache_implementation="static"`) the LLM decode step has static shapes too (`_decode_step`).
`generate(..., compile=True)` compiles both with `torch.compile` (`generation_config.compile_config`; on CUDA its
default mode captures them in CUDA graphs), the patch over a `StaticCache` with prepared mask rows; eager patches use a
`DynamicCache` that needs no mask. Between the two functions the loop syncs once per step to skip the patch decoder
when no sample chose audio, and once for the stopping criteria (as Transformers' own loop). See docs/performance.md.
"""

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from queue import Queue
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import (
    CompileConfig,
    GenerateDecoderOnlyOutput,
    GenerationConfig,
    GenerationMixin,
    GenerationMode,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import ModelOutput


# Generation config keys of MiMo-Audio and their defaults: the audio channel's sampling (`audio_do_sample=None` follows
# the text's `do_sample`), `original_sampling_order` (ban ids after temperature / top-k / top-p, as the original) and
# `compile` (the compiled fast path; `None`: Transformers' rule, compile with a static cache on an accelerator).
MIMO_AUDIO_GENERATION_DEFAULTS = {
    "audio_do_sample": None,
    "audio_temperature": 1.0,
    "audio_top_k": None,
    "audio_top_p": 1.0,
    "original_sampling_order": False,
    "compile": None,
}

# The original's default sampling (`MimoAudio`'s default samplers): text top-k 50 / top-p 0.95 / temperature 0.6,
# audio top-p 0.95 / temperature 0.9. The per-task settings (`TASKS` of `prompting_mimo_audio`) start from these.
ORIGINAL_TEXT_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.95}
ORIGINAL_AUDIO_SAMPLING = {"audio_do_sample": True, "audio_temperature": 0.9, "audio_top_p": 0.95}


def default_compile_config(device: torch.device) -> CompileConfig:
    """
    The compile config of `generate(..., compile=True)` when the generation config names none: static shapes (one
    compiled variant per batch size). On CUDA, mode `"reduce-overhead"` (CUDA graphs). On CPU, Inductor's
    `decompose_mm_pass`: matrix products with one row (every batch-1 decode product) become its own loops, fused with
    the norms, rotary and activations around them, instead of about 1,400 calls of an external GEMM per batch-1 patch
    (docs/performance.md).
    """
    if device.type == "cuda":
        return CompileConfig(dynamic=False, mode="reduce-overhead")
    return CompileConfig(dynamic=False, mode=None, options={"post_grad_fusion_options": {"decompose_mm_pass": {}}})


def default_generation_config(config, tokenizer=None) -> GenerationConfig:
    """
    The generation config a converted checkpoint stores, and the one used for an original checkpoint (which stores
    none): the original's default sampling (`ORIGINAL_TEXT_SAMPLING`, `ORIGINAL_AUDIO_SAMPLING`, no audio top-k); stops
    at end-of-text, `<|im_end|>` and `<|eostm|>`; returns the text and audio sequences (`return_dict_in_generate`).
    No length is stored, so `max_new_tokens` never clashes with a stored `max_length`; without one, `generate` stops
    at the context length (8192 positions, the original's limit).

    A MiMo-V2.5-ASR checkpoint (`config.model_variant == "mimo-v2.5-asr"`) gets that release's ASR settings instead:
    greedy text, audio as above (used only if the model emits `<|empty|>`), stops at end-of-text and `<|im_end|>`.

    Args:
        config ([`MiMoAudioConfig`]): the model's config (special token ids, `model_variant`).
        tokenizer (*optional*): the text tokenizer, for the end-of-text and pad ids.
    """
    asr_only = config.model_variant == "mimo-v2.5-asr"
    eos_ids = [config.im_end_token_id] if asr_only else [config.im_end_token_id, config.eostm_token_id]
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.insert(0, tokenizer.eos_token_id)
    generation_config = GenerationConfig(
        **({"do_sample": False} if asr_only else ORIGINAL_TEXT_SAMPLING),
        **ORIGINAL_AUDIO_SAMPLING,
        audio_top_k=None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else None,
        return_dict_in_generate=True,
    )
    # Keep the audio_* keys when the file is read back (configs "from the model config" drop unknown keys).
    generation_config._from_model_config = False
    return generation_config


@dataclass
class MiMoAudioGenerateOutput(GenerateDecoderOnlyOutput):
    """
    Output of [`MiMoAudioForConditionalGeneration.generate`]. The prompt is included in both sequences.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, total_length)`):
            Text channel: one token per LLM position (`<|empty|>` at audio positions, `pad_token_id` after a sample
            finished).
        audio_sequences (`torch.LongTensor` of shape `(batch_size, total_length, group_size, audio_channels)`):
            Audio channel, aligned with `sequences`; positions without audio hold each codebook's empty id.
        scores (`tuple(torch.FloatTensor)`, *optional*, returned when `return_dict_in_generate=True` and `output_scores=True`):
            Processed text scores at each step, each `(batch_size, vocab_size)`.
        logits (`tuple(torch.FloatTensor)`, *optional*, returned when `return_dict_in_generate=True` and `output_logits=True`):
            Raw text logits at each step, each `(batch_size, vocab_size)`.
        audio_scores (`tuple(tuple(torch.FloatTensor))`, *optional*, returned with `scores`):
            For each step, one tensor per codebook `c` of shape `(batch_size, group_size, audio_vocab_sizes[c])` with the
            processed scores each frame was sampled from. Rows of samples that got no audio patch at that step are NaN.
        audio_logits (`tuple(tuple(torch.FloatTensor))`, *optional*, returned with `logits`):
            Same layout as `audio_scores`, with the raw patch decoder logits.
        attentions, hidden_states (`tuple(tuple(torch.FloatTensor))`, *optional*):
            The LLM's, per step, with `return_dict_in_generate=True` and `output_attentions` / `output_hidden_states`.
        cache (`Cache`, *optional*, returned when `return_dict_in_generate=True`):
            The LLM cache.
    """

    audio_sequences: torch.LongTensor | None = None
    audio_scores: tuple[tuple[torch.FloatTensor, ...], ...] | None = None
    audio_logits: tuple[tuple[torch.FloatTensor, ...], ...] | None = None


@dataclass
class _PatchDecoding:
    """
    What the patch decoder reuses across the patches of one `generate` call, prepared once by
    `_prepare_patch_decoding`.

    Args:
        cache (`Cache`): reset before every patch; a `StaticCache` of `batch_size` x `patch_decoder_steps` positions,
            allocated up front, for compiled steps, else a `DynamicCache`.
        channels (`tuple[tuple[int, ...], ...]`): per step, the codebooks it produces.
        attention_masks (`tuple`): per step, its row of the causal mask over a static cache, in the attention
            implementation's format (`None` with a dynamic cache, which holds only the steps a step attends to).
        position_embeddings (`tuple[tuple[torch.Tensor, torch.Tensor], ...]`): per step, the rotary `(cos, sin)`,
            each `(1, 1, head_dim)`.
        attn_implementation (`str`): the attention implementation the patch decoder runs with while it generates a
            patch (its config's, or eager for a static patch on CPU); the masks are in its format.
    """

    cache: Cache
    channels: tuple[tuple[int, ...], ...]
    attention_masks: tuple[torch.Tensor | None, ...]
    position_embeddings: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    attn_implementation: str


class MiMoAudioStreamer(BaseStreamer):
    """
    Receives every new LLM position while [`MiMoAudioForConditionalGeneration.generate`] runs, and hands it out as an
    iterator (run `generate` in a thread and iterate in the caller, as with Transformers' `TextIteratorStreamer`).

    `generate` calls `put(value, audio_value)`: first once with the prompt (`value` = `input_ids` `(batch_size,
    prompt_length)`, `audio_value=None`), then once per step with the new text tokens `(batch_size,)` and the new audio
    patches `(batch_size, group_size, audio_channels)`; then `end()`. A plain Transformers streamer (for example
    `TextStreamer`) passed to `generate` receives only the text tokens, through `put(value)`.

    Subclasses can override `on_step(text_ids, audio_ids)` to act on each step directly instead of queueing it.

    Args:
        skip_prompt (`bool`, *optional*, defaults to `True`):
            Whether to drop the prompt instead of yielding it as a first `(input_ids, None)` item.
        timeout (`float`, *optional*):
            Seconds the iterator waits for the next item before raising `queue.Empty`; `None` waits forever.
    """

    def __init__(self, skip_prompt: bool = True, timeout: float | None = None):
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self.queue = Queue()
        self._stop_signal = object()
        self._next_is_prompt = True

    def put(self, value: torch.Tensor, audio_value: torch.Tensor | None = None):
        if self._next_is_prompt:
            self._next_is_prompt = False
            if self.skip_prompt:
                return
        self.on_step(value, audio_value)

    def on_step(self, text_ids: torch.Tensor, audio_ids: torch.Tensor | None):
        """Called for the prompt (unless skipped) and for every generated position."""
        self.queue.put((text_ids, audio_ids), timeout=self.timeout)

    def end(self):
        self._next_is_prompt = True
        self.queue.put(self._stop_signal, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        item = self.queue.get(timeout=self.timeout)
        if item is self._stop_signal:
            raise StopIteration()
        return item


def _check_audio_generation_config(generation_config: GenerationConfig):
    temperature = generation_config.audio_temperature
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"`audio_temperature` must be a positive number, got {temperature!r}.")
    top_k = generation_config.audio_top_k
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"`audio_top_k` must be None or a non-negative integer, got {top_k!r}.")
    top_p = generation_config.audio_top_p
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"`audio_top_p` must be in (0, 1], got {top_p!r}.")
    for key in ("audio_do_sample", "original_sampling_order"):
        if not isinstance(getattr(generation_config, key), bool):
            raise ValueError(f"`{key}` must be a bool, got {getattr(generation_config, key)!r}.")
    if generation_config.compile is not None and not isinstance(generation_config.compile, bool):
        raise ValueError(f"`compile` must be None or a bool, got {generation_config.compile!r}.")


def _sampling_scores(scores: torch.Tensor, used_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    With `original_sampling_order`, temperature / top-k / top-p may keep only banned tokens. That is an error for a
    row whose token is used (the original fails there too); a row whose token is discarded (a sample that chose text,
    or has finished) samples from zeros instead. `scores` `(batch_size, vocab)`, `used_rows` `(batch_size,)` bool.

    Returns the scores to sample from and a bool tensor `()`, True when a used row has no allowed token (checked by
    the caller through `_raise_if_sampling_failed`, so that no host synchronisation happens here).
    """
    allowed = torch.isfinite(scores).any(dim=-1)
    failed = (used_rows.to(allowed.device) & ~allowed).any()
    return torch.where(allowed[:, None], scores, torch.zeros_like(scores)), failed


def _raise_if_sampling_failed(failed: torch.Tensor | bool, channel: str):
    if failed:
        raise ValueError(
            f"With `original_sampling_order=True`, temperature / top-k / top-p kept only banned tokens for {channel} "
            "(the original fails at this step too): raise top_k / top_p, or use the default order."
        )


def _guard_stance(seen: bool):
    """
    Guard evaluation of a compiled step function: full on its first call in a `generate` call (which picks, or
    compiles, the variant for these inputs); afterwards only the guards that tell its compiled variants apart, since
    every later step of the call passes the same objects with the same shapes, dtypes and devices. (Full guards cost
    about 1 ms per call on CPU, as much as several of the patch decoder's layers.)
    """
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True) if seen else nullcontext()


class MiMoAudioGenerationMixin(GenerationMixin):
    """Generation for `MiMoAudioForConditionalGeneration`: one LLM position per step, plus a `group_size` x
    `audio_channels` audio patch from the patch decoder whenever the text head chooses `<|empty|>`."""

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        audio_input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer: BaseStreamer | None = None,
        **kwargs,
    ) -> MiMoAudioGenerateOutput | torch.LongTensor:
        r"""
        Generates text and audio, one LLM position per step (see the module docstring).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*):
                Text channel of the prompt, left-padded for batches; audio positions hold `<|empty|>`. Without it,
                generation starts from `bos_token_id` (of the generation config, else `<|im_start|>`), as
                Transformers models do.
            audio_input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length, group_size, audio_channels)`, *optional*):
                Audio channel of the prompt. Needed when `input_ids` holds `<|empty|>` (audio positions); defaults to
                all empty ids for a text-only prompt.
            attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*):
                0 at left padding.
            generation_config (`GenerationConfig`, *optional*):
                Besides the usual text controls (`do_sample`, `temperature`, `top_k`, `top_p`, `max_new_tokens`,
                `min_new_tokens`, `eos_token_id` = the stop ids, ...; lengths count LLM positions), it reads the audio
                controls `audio_do_sample` (default: `do_sample`), `audio_temperature` (1.0), `audio_top_k` (None)
                and `audio_top_p` (1.0). Any of them can also be passed as keyword arguments. Without any length
                setting, generation stops at `text_config.max_position_embeddings` positions (prompt included).
            streamer (`BaseStreamer`, *optional*):
                A [`MiMoAudioStreamer`] receives each step's text tokens and audio patches; any other streamer
                receives the text tokens.
            kwargs:
                Generation controls, `logits_processor` / `stopping_criteria` for the text channel, and model kwargs.

        Returns:
            With `return_dict_in_generate=True`: a [`MiMoAudioGenerateOutput`] with `sequences`
            `(batch_size, total_length)` and `audio_sequences` `(batch_size, total_length, group_size,
            audio_channels)`, prompt included, plus scores, logits and the cache when asked for. With
            `return_dict_in_generate=False`, as every Transformers model: the `sequences` tensor (text channel) only;
            the generated audio needs the dict output. The default is the generation config's: a converted
            checkpoint (`default_generation_config`) and an original one return the dict, a model built from a config
            the tensor, as any Transformers model.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        generation_mode = kwargs.pop("generation_mode", None)  # set by the any-to-any pipeline
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("`generate` takes `input_ids` and `audio_input_ids`, not `inputs_embeds`.")
        config = self.config
        if input_ids is None:
            input_ids = self._start_ids(generation_config, attention_mask, kwargs)
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch_size, prompt_length), got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] == 0:
            raise ValueError("`input_ids` is an empty prompt (prompt_length 0): give at least one position.")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}."
            )
        if generation_mode not in (None, "text", "audio"):
            raise ValueError(f"`generation_mode` must be 'text' or 'audio', got {generation_mode!r}.")
        if generation_mode == "audio" and not (input_ids[:, -1] == config.sostm_token_id).all():
            raise ValueError(
                "generation_mode='audio' needs a prompt that opens a speech answer (`<|sostm|>` last): build it with "
                "`output_modality='audio'` (in a pipeline: `processor_kwargs={'output_modality': 'audio'}`)."
            )
        patch_shape = (config.group_size, config.audio_channels)
        if audio_input_ids is None:
            if (input_ids == config.empty_token_id).any():
                raise ValueError(
                    f"`input_ids` holds audio positions (`<|empty|>`, id {config.empty_token_id}) but "
                    "`audio_input_ids` is None: pass the prompt's audio codes as `audio_input_ids` (the processor "
                    "returns them)."
                )
            empty_ids = torch.tensor(config.audio_empty_ids, dtype=torch.long, device=input_ids.device)
            audio_input_ids = empty_ids.expand(*input_ids.shape, *patch_shape)
        elif audio_input_ids.shape != (*input_ids.shape, *patch_shape):
            raise ValueError(
                f"`audio_input_ids` must have shape (batch_size, prompt_length, group_size, audio_channels) = "
                f"{(*input_ids.shape, *patch_shape)}, got {tuple(audio_input_ids.shape)}."
            )
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        lengths = ("max_length", "max_new_tokens")
        if not any(
            kwargs.get(key) is not None
            or getattr(generation_config, key, None) is not None
            or getattr(self.generation_config, key, None) is not None
            for key in lengths
        ):
            kwargs["max_length"] = config.text_config.max_position_embeddings
        return super().generate(
            input_ids.long(),
            generation_config=generation_config,
            streamer=streamer,
            audio_input_ids=audio_input_ids.long().contiguous(),
            **kwargs,
        )

    def _start_ids(
        self, generation_config: GenerationConfig | None, attention_mask: torch.Tensor | None, kwargs: dict
    ) -> torch.LongTensor:
        """The prompt of a `generate` call without `input_ids`: `bos_token_id` (else `<|im_start|>`), `(batch_size, 1)`
        with the batch size of `attention_mask` (else 1)."""
        bos_token_id = kwargs.get("bos_token_id")
        for source in (generation_config, self.generation_config):
            if bos_token_id is None and source is not None:
                bos_token_id = source.bos_token_id
        if bos_token_id is None:
            bos_token_id = self.config.im_start_token_id
        batch_size = attention_mask.shape[0] if attention_mask is not None else 1
        return torch.full((batch_size, 1), int(bos_token_id), dtype=torch.long, device=self.device)

    def _prepare_generation_config(
        self, generation_config: GenerationConfig | None, **kwargs: Any
    ) -> tuple[GenerationConfig, dict]:
        mimo_kwargs = {key: kwargs.pop(key) for key in MIMO_AUDIO_GENERATION_DEFAULTS if key in kwargs}
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        for key, default in MIMO_AUDIO_GENERATION_DEFAULTS.items():
            if key in mimo_kwargs:
                setattr(generation_config, key, mimo_kwargs[key])
            elif getattr(generation_config, key, None) is None:
                setattr(generation_config, key, default)
        if generation_config.audio_do_sample is None:
            generation_config.audio_do_sample = bool(generation_config.do_sample)
        _check_audio_generation_config(generation_config)

        original_get_generation_mode = generation_config.get_generation_mode

        def get_generation_mode(assistant_model=None):
            generation_mode = original_get_generation_mode(assistant_model)
            if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
                raise ValueError(
                    f"MiMo-Audio generates with greedy search or sampling only, got {generation_mode}: set "
                    "`num_beams=1` and no assistant model."
                )
            return generation_mode

        generation_config.get_generation_mode = get_generation_mode
        if generation_config.compile and generation_config.cache_implementation is None:
            if model_kwargs.get("cache") is None:  # the compiled decode step needs a static LLM cache
                generation_config.cache_implementation = "static"
        return generation_config, model_kwargs

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, audio_input_ids=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, **kwargs
        )
        if audio_input_ids is not None:
            length = model_inputs["input_ids"].shape[1]
            model_inputs["audio_input_ids"] = audio_input_ids[:, -length:].to(model_inputs["input_ids"].device)
        return model_inputs

    def _get_logits_processor(self, generation_config: GenerationConfig, *args, **kwargs) -> LogitsProcessorList:
        """Transformers' text processors; with `original_sampling_order`, the min-length bans of stop ids go last
        (after temperature / top-k / top-p), as the original removes them from the already filtered scores."""
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if not generation_config.original_sampling_order:
            return processors
        ban_types = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)
        bans = [p for p in processors if isinstance(p, ban_types)]
        return LogitsProcessorList([p for p in processors if not isinstance(p, ban_types)] + bans)

    def _audio_warpers(self, generation_config: GenerationConfig) -> LogitsProcessorList:
        """Warpers applied to each codebook's scores when `audio_do_sample` (after its empty id is banned, or before
        with `original_sampling_order`)."""
        warpers = LogitsProcessorList()
        if not generation_config.audio_do_sample:
            return warpers
        if generation_config.audio_temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(generation_config.audio_temperature))
        if generation_config.audio_top_k:
            warpers.append(TopKLogitsWarper(generation_config.audio_top_k))
        if generation_config.audio_top_p < 1.0:
            warpers.append(TopPLogitsWarper(generation_config.audio_top_p))
        return warpers

    def _prepare_patch_decoding(self, batch_size: int, device: torch.device, static: bool) -> _PatchDecoding:
        """
        The patch decoder's cache, step schedule, masks and rotary tables, built once per `generate` call and reused
        for every patch (see [`_PatchDecoding`]). `static`: a `StaticCache` of all the patch's steps, allocated up
        front, with one causal-mask row per step (fixed shapes, for compiled steps); else a `DynamicCache` that holds
        exactly the steps so far, so that a step attends to all of it without a mask (fewer operations per layer in
        eager mode; the same attention). A static patch on CPU runs eager attention instead of SDPA: over at most
        `patch_decoder_steps` positions, Inductor fuses it into its own loops, where each SDPA call is an external
        kernel of about 30 us (1 query, 11 keys), 176 per patch at the released sizes.
        """
        config = self.config
        decoder_config = config.patch_decoder_config
        steps = config.patch_decoder_steps
        dtype = self.patch_decoder.input_proj.weight.dtype
        _, active = self.delay_audio_codes(
            torch.zeros(1, config.group_size, config.audio_channels, dtype=torch.long, device=device)
        )
        channels = tuple(tuple(row.nonzero().flatten().tolist()) for row in active.cpu())
        position_ids = torch.arange(steps, device=device)[None]
        inputs_embeds = torch.zeros(batch_size, steps, decoder_config.hidden_size, dtype=dtype, device=device)
        cos, sin = self.patch_decoder.rotary_emb(inputs_embeds, position_ids)
        attn_implementation = decoder_config._attn_implementation
        if static:
            if decoder_config._attn_implementation == "sdpa" and device.type == "cpu":
                attn_implementation = "eager"
                decoder_config = copy.copy(decoder_config)  # the masks in eager format
                decoder_config._attn_implementation_internal = attn_implementation
            cache = StaticCache(config=decoder_config, max_cache_len=steps)
            head_dim = getattr(decoder_config, "head_dim", None) or decoder_config.hidden_size // (
                decoder_config.num_attention_heads
            )
            cache.early_initialization(batch_size, decoder_config.num_key_value_heads, head_dim, dtype, device)
            # The causal mask of all steps at once; step t attends to the cache's positions 0..t.
            mask = create_causal_mask(
                config=decoder_config,
                inputs_embeds=inputs_embeds,
                attention_mask=None,
                cache=None,
                position_ids=position_ids,
                allow_is_causal_skip=False,
            )
            if mask is not None and not isinstance(mask, torch.Tensor):
                raise ValueError(
                    f"The patch decoder's attention implementation {decoder_config._attn_implementation!r} is not "
                    "supported for compiled generation: use 'sdpa' or 'eager'."
                )
            masks = tuple(None if mask is None else mask[:, :, step : step + 1] for step in range(steps))
        else:
            cache = DynamicCache(config=decoder_config)
            masks = (None,) * steps
        return _PatchDecoding(
            cache=cache,
            channels=channels,
            attention_masks=masks,
            position_embeddings=tuple((cos[:, step : step + 1], sin[:, step : step + 1]) for step in range(steps)),
            attn_implementation=attn_implementation,
        )

    def _generate_audio_patch(
        self,
        backbone_hidden_state: torch.Tensor,
        decoding: _PatchDecoding,
        audio_do_sample: bool,
        original_order: bool,
        audio_warpers: LogitsProcessorList,
        keep_scores: bool,
        used_rows: torch.BoolTensor,
    ) -> tuple[torch.LongTensor, torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """
        Runs the patch decoder for one LLM position of every sample: step `t` produces frame `t - delay_pattern[c]`
        of each codebook `c` with `0 <= t - delay_pattern[c] < group_size`, and the sum of their embeddings is the
        input of step `t + 1`. Static shapes and no host synchronisation: the whole patch can be compiled or
        captured as one graph (see `_generation_step_functions`).

        Args:
            backbone_hidden_state (`torch.Tensor` of shape `(batch_size, hidden_size)`): the LLM's last hidden state.
            decoding (`_PatchDecoding`): from `_prepare_patch_decoding`; its cache is reset here.
            audio_do_sample (`bool`): sample the codes (else greedy).
            original_order (`bool`): ban the empty ids after the warpers, as the original (sampling only).
            audio_warpers (`LogitsProcessorList`): from `_audio_warpers`.
            keep_scores (`bool`): also return the logits and processed scores.
            used_rows (`torch.BoolTensor` of shape `(batch_size,)`): the samples whose patch is kept; with
                `original_order`, only their sampling must be possible.

        Returns:
            codes `(batch_size, group_size, audio_channels)`, a bool tensor `(audio_channels,)` that is True for a
            codebook whose sampling in the original order was impossible for a used row, and, if `keep_scores`, per
            codebook the raw logits and the processed scores `(batch_size, group_size, audio_vocab_sizes[c])` (else
            `None`).
        """
        config = self.config
        empty_ids, delay_pattern = config.audio_empty_ids, config.delay_pattern
        batch_size = backbone_hidden_state.shape[0]
        device = backbone_hidden_state.device
        codes = torch.empty(batch_size, config.group_size, config.audio_channels, dtype=torch.long, device=device)
        # Codes of the current step, reused by every step: entries of inactive codebooks are ignored when embedding.
        step_codes = torch.zeros_like(codes[:, :1])
        sampling_failed = torch.zeros(config.audio_channels, dtype=torch.bool, device=device)
        raw = [[] for _ in empty_ids] if keep_scores else None
        processed = [[] for _ in empty_ids] if keep_scores else None
        last_step = len(decoding.channels) - 1

        decoding.cache.reset()
        inputs_embeds = self.get_patch_decoder_inputs(backbone_hidden_state[:, None])
        for step, channels in enumerate(decoding.channels):
            hidden = self.patch_decoder.decode_step(
                inputs_embeds,
                decoding.cache,
                decoding.attention_masks[step],
                decoding.position_embeddings[step],
                decoding.attn_implementation,
            )[:, -1]
            for channel in channels:
                logits = self.get_audio_logits(hidden, channel).float()
                scores = logits.clone() if keep_scores else logits
                if original_order:
                    scores = audio_warpers(codes, scores) if audio_warpers else scores
                    scores[:, empty_ids[channel]] = float("-inf")
                    sampling_scores, failed = _sampling_scores(scores, used_rows)
                    sampling_failed[channel] = failed
                else:
                    scores[:, empty_ids[channel]] = float("-inf")
                    if audio_warpers:
                        scores = audio_warpers(codes, scores)
                    sampling_scores = scores
                if audio_do_sample:
                    probs = nn.functional.softmax(sampling_scores, dim=-1)
                    tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
                else:
                    tokens = torch.argmax(scores, dim=-1)
                step_codes[:, 0, channel] = tokens
                codes[:, step - delay_pattern[channel], channel] = tokens
                if keep_scores:
                    raw[channel].append(logits)
                    processed[channel].append(scores)
            if step < last_step:
                inputs_embeds = self.embed_patch_decoder_codes(step_codes, channels=channels).to(inputs_embeds.dtype)
        if not keep_scores:
            return codes, sampling_failed, None, None
        raw = [torch.stack(rows, dim=1) for rows in raw]
        return codes, sampling_failed, raw, [torch.stack(rows, dim=1) for rows in processed]

    def _decode_step(
        self,
        input_ids: torch.LongTensor,
        audio_input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: StaticCache,
        **kwargs,
    ) -> ModelOutput:
        """
        One LLM position of every sample on a static cache, with static shapes and no host synchronisation, so that
        it can be compiled or captured: the patch encoder runs on every sample's patch and its output is kept where
        the text is `<|empty|>` (`MiMoAudioModel.get_decode_inputs_embeds`).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, 1)`): the new text tokens.
            audio_input_ids (`torch.LongTensor` of shape `(batch_size, 1, group_size, audio_channels)`): their patches.
            attention_mask (`torch.Tensor` of shape `(batch_size, max_cache_len)`, *optional*): 0 at left padding, 1
                everywhere else (positions after the current one are hidden by the causal mask).
            position_ids (`torch.LongTensor` of shape `(batch_size, 1)`).
            cache (`StaticCache`): the LLM's cache, updated in place.
            kwargs: `output_attentions`, `output_hidden_states`.

        Returns:
            [`MiMoAudioOutputWithPast`] with `logits` `(batch_size, 1, vocab_size)` and `last_hidden_state`
            `(batch_size, 1, hidden_size)`.
        """
        inputs_embeds = self.model.get_decode_inputs_embeds(input_ids, audio_input_ids)
        return self(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,
            **kwargs,
        )

    def _generation_step_functions(self, generation_config: GenerationConfig, model_kwargs: dict) -> tuple:
        """
        The decode step and the patch function `_sample` calls, and whether they are compiled:
        `(_decode_step, _generate_audio_patch, compiled)`. They are compiled when `generation_config.compile` is True, or when it is None and Transformers' rule applies (a static cache
        on an accelerator, see `_valid_auto_compile_criteria`). The compiled functions are kept on the model and reused
        while the compile config stays the same; `torch.compile` specialises them per batch size (`dynamic=False`
        by default), so compilation is paid once per batch size.
        """
        compile_steps = generation_config.compile
        if compile_steps is None:
            compile_steps = self._valid_auto_compile_criteria(model_kwargs, generation_config)
        if not compile_steps:
            return self._decode_step, self._generate_audio_patch, False
        compile_config = generation_config.compile_config
        if compile_config is None:
            compile_config = default_compile_config(self.device)
        options = compile_config.to_dict()
        if getattr(self, "_compiled_generation_options", None) != options:
            self._compiled_generation_options = options
            self._compiled_generation_steps = (
                torch.compile(self._decode_step, **options),
                torch.compile(self._generate_audio_patch, **options),
            )
        return (*self._compiled_generation_steps, True)

    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        synced_gpus: bool = False,
        streamer: BaseStreamer | None = None,
        **model_kwargs,
    ) -> MiMoAudioGenerateOutput:
        config = self.config
        pad_token_id = generation_config._pad_token_tensor
        return_dict_in_generate = generation_config.return_dict_in_generate
        output_scores = return_dict_in_generate and generation_config.output_scores
        output_logits = return_dict_in_generate and generation_config.output_logits
        output_attentions = return_dict_in_generate and generation_config.output_attentions
        output_hidden_states = return_dict_in_generate and generation_config.output_hidden_states
        has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        if has_eos_stopping_criteria and pad_token_id is None:
            raise ValueError("Stopping on `eos_token_id` needs a `pad_token_id` for the finished samples.")
        if pad_token_id is not None:
            pad_token_id = pad_token_id.to(input_ids.device)
        mimo_streamer = isinstance(streamer, MiMoAudioStreamer)

        scores = () if output_scores else None
        raw_logits = () if output_logits else None
        audio_scores = () if output_scores else None
        audio_logits = () if output_logits else None
        attentions = () if output_attentions else None
        hidden_states = () if output_hidden_states else None

        batch_size, prompt_length = input_ids.shape
        device = input_ids.device
        unfinished_sequences = torch.ones(batch_size, dtype=torch.long, device=device)
        this_peer_finished = False
        empty_patch = torch.tensor(config.audio_empty_ids, dtype=torch.long, device=device).expand(
            batch_size, config.group_size, config.audio_channels
        )
        audio_warpers = self._audio_warpers(generation_config)
        audio_do_sample = generation_config.audio_do_sample
        original_audio_order = generation_config.original_sampling_order and audio_do_sample
        keep_audio_scores = output_scores or output_logits

        # Both channels are written in place into buffers of the final length (no copy of the sequences per step).
        total_length = max(generation_config.max_length, prompt_length + 1)
        sequences = input_ids.new_zeros((batch_size, total_length))
        sequences[:, :prompt_length] = input_ids
        audio_sequences = empty_patch[:, None].expand(-1, total_length, -1, -1).clone()
        audio_sequences[:, :prompt_length] = model_kwargs.pop("audio_input_ids")
        length = prompt_length

        cache = model_kwargs.get("cache")
        static_decoding = model_kwargs.get("use_cache", True) and cache is not None and cache.is_compileable
        decode_step, generate_audio_patch, compiled = self._generation_step_functions(generation_config, model_kwargs)
        model_kwargs["audio_input_ids"] = audio_sequences[:, :length]
        outputs = self._prefill(sequences[:, :length], generation_config, model_kwargs)
        if static_decoding:
            # The padding mask over the whole static cache, and the positions, prepared once for every step.
            attention_mask = model_kwargs.get("attention_mask")
            mask_length = cache.get_max_length()
            full_mask = None
            if attention_mask is not None:
                full_mask = attention_mask.new_ones((batch_size, mask_length))
                full_mask[:, : attention_mask.shape[1]] = attention_mask
                position_ids = attention_mask.long().sum(-1, keepdim=True) - 1
            else:
                position_ids = torch.full((batch_size, 1), length - 1, dtype=torch.long, device=device)
        patch_decoding = self._prepare_patch_decoding(batch_size, outputs.last_hidden_state.device, static=compiled)
        prefill_consumed = decode_step_seen = patch_seen = False
        while self._has_unfinished_sequences(this_peer_finished, synced_gpus, device=device):
            if prefill_consumed:
                if static_decoding:
                    position_ids = position_ids + 1
                    with _guard_stance(decode_step_seen):
                        outputs = decode_step(
                            sequences[:, length - 1 : length],
                            audio_sequences[:, length - 1 : length],
                            full_mask,
                            position_ids,
                            cache,
                            output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states,
                        )
                    decode_step_seen = compiled
                else:
                    model_kwargs["audio_input_ids"] = audio_sequences[:, :length]
                    model_inputs = self.prepare_inputs_for_generation(
                        sequences[:, :length],
                        next_sequence_length=1 if model_kwargs["use_cache"] else None,
                        **model_kwargs,
                    )
                    outputs = self(**model_inputs, return_dict=True)
            prefill_consumed = True
            if not static_decoding:
                model_kwargs = self._update_model_kwargs_for_generation(outputs, model_kwargs)
            if synced_gpus and this_peer_finished:
                continue

            # 1. text channel
            next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=device)
            next_token_scores = logits_processor(sequences[:, :length], next_token_logits)
            if generation_config.do_sample:
                sampling_scores = next_token_scores
                if generation_config.original_sampling_order:
                    sampling_scores, failed = _sampling_scores(next_token_scores, unfinished_sequences.bool())
                    _raise_if_sampling_failed(failed, "the text channel")
                probs = nn.functional.softmax(sampling_scores, dim=-1)
                next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(next_token_scores, dim=-1)
            if has_eos_stopping_criteria:
                next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)

            # 2. audio channel: a patch wherever the text token is <|empty|>
            is_audio = next_tokens == config.empty_token_id
            step_audio_logits = step_audio_scores = None
            if is_audio.any():
                with torch.inference_mode(), _guard_stance(patch_seen):
                    patch, failed, step_audio_logits, step_audio_scores = generate_audio_patch(
                        # the same strides after prefill and decode steps (one compiled variant)
                        outputs.last_hidden_state[:, -1].clone(memory_format=torch.contiguous_format),
                        patch_decoding,
                        audio_do_sample,
                        original_audio_order,
                        audio_warpers,
                        keep_audio_scores,
                        is_audio,
                    )
                patch_seen = compiled
                if original_audio_order and failed.any():
                    _raise_if_sampling_failed(True, f"codebook {int(failed.int().argmax())}")
                next_patch = torch.where(is_audio[:, None, None], patch.to(device), empty_patch)
            else:
                next_patch = empty_patch

            if output_scores:
                scores += (next_token_scores,)
                audio_scores += (self._mask_audio_rows(step_audio_scores, is_audio, batch_size),)
            if output_logits:
                raw_logits += (next_token_logits,)
                audio_logits += (self._mask_audio_rows(step_audio_logits, is_audio, batch_size),)
            if output_attentions:
                attentions += (outputs.attentions,)
            if output_hidden_states:
                hidden_states += (outputs.hidden_states,)

            sequences[:, length] = next_tokens
            audio_sequences[:, length] = next_patch
            length += 1
            if streamer is not None:
                if mimo_streamer:
                    streamer.put(next_tokens.cpu(), next_patch.cpu())
                else:
                    streamer.put(next_tokens.cpu())

            unfinished_sequences = unfinished_sequences & ~stopping_criteria(sequences[:, :length], scores)
            this_peer_finished = unfinished_sequences.max() == 0
            del outputs

        if streamer is not None:
            streamer.end()

        if not return_dict_in_generate:
            return sequences[:, :length].clone()
        return MiMoAudioGenerateOutput(
            sequences=sequences[:, :length].clone(),
            audio_sequences=audio_sequences[:, :length].clone(),
            scores=scores,
            logits=raw_logits,
            audio_scores=audio_scores,
            audio_logits=audio_logits,
            attentions=attentions,
            hidden_states=hidden_states,
            cache=model_kwargs.get("cache"),
        )

    def _mask_audio_rows(
        self, per_channel: list[torch.Tensor] | None, is_audio: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, ...]:
        """Per-codebook `(batch_size, group_size, vocab)` tensors with NaN rows where no patch was generated."""
        config = self.config
        if per_channel is None:
            return tuple(
                torch.full((batch_size, config.group_size, vocab), float("nan"), device=is_audio.device)
                for vocab in config.audio_vocab_sizes
            )
        return tuple(values.masked_fill(~is_audio[:, None, None], float("nan")) for values in per_channel)
