"""Fine-tuning and RL helpers for MiMo-Audio: quantization defaults, LoRA target presets, the SFT data collator and
teacher-forced log-probabilities of text tokens and audio codes.

Training data follows the official recipe: every position outside the assistant replies is ignored on all channels
(system and user turns, the `<|im_start|>assistant\\n` header and, when thinking is off, the empty thinking block
`<think>\\n\\n</think>\\n`); each assistant reply and its closing `<|im_end|>\\n` are trained, text and audio.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import ModelOutput

from .modeling_mimo_audio import IGNORE_INDEX, MiMoAudioForConditionalGeneration


# Modules that quantization leaves in full precision, as the model class declares them (see docs/quantization.md for
# the measurements): the codebook embeddings, the patch encoder and the whole patch decoder (its input projection,
# transformer and per-codebook heads). Only the LLM's linear layers are quantized; `lm_head` stays unquantized through
# Transformers' default. A custom `llm_int8_skip_modules` replaces those defaults: pass `QUANTIZATION_SKIP_MODULES`
# plus your own names to keep the same split.
UNQUANTIZED_MODULES = tuple(MiMoAudioForConditionalGeneration._keep_in_fp32_modules)
QUANTIZATION_SKIP_MODULES = ("lm_head", *UNQUANTIZED_MODULES)

# LoRA target presets (regular expressions matched in full against module names, as PEFT does for a string).
_TRANSFORMER_PROJECTIONS = r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
LORA_TARGET_MODULES = {
    # Attention and MLP projections of every LLM (Qwen2 backbone) layer.
    "language_model": rf"model\.language_model\.layers\.\d+\.{_TRANSFORMER_PROJECTIONS}",
    # The patch decoder: its input projection, embedding projection (when present) and every layer's projections.
    "patch_decoder": rf"patch_decoder\.(input_proj|embeddings_proj|layers\.\d+\.{_TRANSFORMER_PROJECTIONS})",
}
LORA_TARGET_MODULES["language_model_and_patch_decoder"] = (
    f"({LORA_TARGET_MODULES['language_model']})|({LORA_TARGET_MODULES['patch_decoder']})"
)


def get_lora_target_modules(preset: str = "language_model") -> str:
    """
    The `target_modules` regular expression of a LoRA preset, for `peft.LoraConfig(target_modules=...)`.

    Args:
        preset (`str`, defaults to `"language_model"`): one of `"language_model"` (LLM attention and MLP),
            `"patch_decoder"` (patch decoder projections) or `"language_model_and_patch_decoder"` (both).

    The patch encoder, the embedding tables and the output heads are not targeted; train the codebook heads with
    `modules_to_save=[f"patch_decoder.heads.{c}" for c in range(config.audio_channels)]` when needed.
    """
    if preset not in LORA_TARGET_MODULES:
        raise ValueError(f"Unknown LoRA preset {preset!r}; choose one of {sorted(LORA_TARGET_MODULES)}.")
    return LORA_TARGET_MODULES[preset]


# ----------------------------------------------------------------------------------------------------- SFT collator


def _find(sequence: list[int], pattern: list[int], start: int) -> int:
    """Index of the first occurrence of `pattern` in `sequence` at or after `start`, or -1."""
    length = len(pattern)
    for index in range(start, len(sequence) - length + 1):
        if sequence[index : index + length] == pattern:
            return index
    return -1


class MiMoAudioDataCollator:
    r"""
    Batches supervised fine-tuning samples and builds `labels` / `audio_labels` with the official recipe's masking.

    The assistant replies are found in the token ids themselves: each `<|im_start|>assistant\n` header opens one, the
    next `<|im_end|>` closes it. The header and, when the reply starts with it, the empty thinking block
    `<think>\n\n</think>\n` (thinking off) are ignored; the reply, its `<|im_end|>` and the `\n` after it are trained.
    A reply that opens with `<think>\n` and a real reasoning (thinking on) is trained whole. Every other position
    (system, user, padding) is -100 on the text channel and on every audio channel. Audio labels hold the codes of
    the trained positions (the model reads them where the next text label is `<|empty|>`).

    Build samples with the processor, e.g. `processor.apply_chat_template(messages, add_generation_prompt=False)`
    where `messages` ends with the assistant turn to learn (text, or text + audio for speech output; a text answer
    takes `"thinking": ""` to open with the empty thinking block, as the inference prompt does).

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]): the MiMo-Audio text tokenizer (for the header, thinking block,
            turn end and pad ids).
        audio_empty_ids (`list[int]`): each codebook's empty id (`config.audio_empty_ids`), to pad the audio channel.
        padding_side (`str`, defaults to `"right"`): `"right"` for training (the usual choice, positions unaffected)
            or `"left"`; the model computes positions from `attention_mask`, so both give the same loss.
        pad_to_multiple_of (`int`, *optional*): pad the length to a multiple of this.

    Call it with a list of features, each a mapping with `input_ids` `(seq_len,)` or `(batch, seq_len)` and
    `audio_input_ids` `(seq_len, group_size, audio_channels)` or `(batch, seq_len, group_size, audio_channels)`,
    plus an optional `attention_mask` (padding is removed before re-padding). Returns a dict of tensors: `input_ids`,
    `audio_input_ids`, `attention_mask`, `labels` `(batch, seq_len)` and `audio_labels`
    `(batch, seq_len, group_size, audio_channels)`.
    """

    def __init__(
        self,
        tokenizer,
        audio_empty_ids: list[int],
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer needs a pad token.")
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = tokenizer.pad_token_id
        self.audio_empty_ids = torch.tensor([int(value) for value in audio_empty_ids], dtype=torch.long)

        def encode(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self.assistant_header = encode("<|im_start|>assistant\n")
        self.empty_thinking = encode("<think>\n\n</think>\n")
        self.turn_end = encode("<|im_end|>\n")

    def assistant_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """
        True at the trained positions of one unpadded sample `(seq_len,)`: every assistant reply and its turn end.
        Raises a `ValueError` when the sample has no assistant reply.
        """
        ids = input_ids.tolist()
        mask = torch.zeros(len(ids), dtype=torch.bool)
        end_id = self.turn_end[0]
        header = _find(ids, self.assistant_header, 0)
        if header < 0:
            raise ValueError(
                "A sample has no `<|im_start|>assistant\\n` turn, so nothing would be trained: build it with "
                "`add_generation_prompt=False` from messages that end with an assistant turn."
            )
        while header >= 0:
            start = header + len(self.assistant_header)
            if ids[start : start + len(self.empty_thinking)] == self.empty_thinking:
                start += len(self.empty_thinking)
            end = ids.index(end_id, start) if end_id in ids[start:] else len(ids) - 1
            if ids[end : end + len(self.turn_end)] == self.turn_end:
                end += len(self.turn_end) - 1
            mask[start : end + 1] = True
            header = _find(ids, self.assistant_header, end + 1)
        if not mask.any():
            raise ValueError("A sample's assistant turn is empty, so nothing would be trained.")
        return mask

    def _samples(self, features: list[dict[str, Any]]):
        """Yields unpadded `(input_ids (T,), audio_input_ids (T, G, C))` pairs."""
        for index, feature in enumerate(features):
            if "input_ids" not in feature or "audio_input_ids" not in feature:
                raise ValueError(f"Feature {index} needs `input_ids` and `audio_input_ids`, got {sorted(feature)}.")
            input_ids = torch.as_tensor(feature["input_ids"]).long()
            audio = torch.as_tensor(feature["audio_input_ids"]).long()
            if input_ids.dim() == 1:
                input_ids, audio = input_ids[None], audio[None]
            if input_ids.dim() != 2 or audio.dim() != 4 or audio.shape[:2] != input_ids.shape:
                shapes = f"`input_ids` {tuple(input_ids.shape)} and `audio_input_ids` {tuple(audio.shape)}"
                raise ValueError(
                    f"Feature {index}: {shapes} must be (seq_len,) and (seq_len, group_size, audio_channels), "
                    "or batched with a leading dim."
                )
            if audio.shape[-1] != len(self.audio_empty_ids):
                raise ValueError(
                    f"Feature {index}: `audio_input_ids` has {audio.shape[-1]} channels, "
                    f"expected {len(self.audio_empty_ids)}."
                )
            mask = feature.get("attention_mask")
            mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
            if mask.dim() == 1:
                mask = mask[None]
            if mask.shape != input_ids.shape:
                raise ValueError(f"Feature {index}: `attention_mask` {tuple(mask.shape)} must match `input_ids`.")
            for row in range(input_ids.shape[0]):
                yield input_ids[row][mask[row]], audio[row][mask[row]]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        samples = list(self._samples(features))
        if not samples:
            raise ValueError("The collator got no samples.")
        length = max(ids.shape[0] for ids, _ in samples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        group_size, channels = samples[0][1].shape[1:]
        batch = len(samples)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        audio_input_ids = self.audio_empty_ids.repeat(batch, length, group_size, 1)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        audio_labels = torch.full((batch, length, group_size, channels), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, audio) in enumerate(samples):
            if audio.shape[1:] != (group_size, channels):
                raise ValueError("All samples must have the same (group_size, audio_channels).")
            trained = self.assistant_mask(ids)
            span = slice(0, ids.shape[0]) if self.padding_side == "right" else slice(length - ids.shape[0], length)
            input_ids[row, span] = ids
            audio_input_ids[row, span] = audio
            attention_mask[row, span] = 1
            labels[row, span] = ids.masked_fill(~trained, IGNORE_INDEX)
            audio_labels[row, span] = audio.masked_fill(~trained[:, None, None], IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "audio_input_ids": audio_input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "audio_labels": audio_labels,
        }


# ---------------------------------------------------------------------------------------------- RL log-probabilities


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
    "LORA_TARGET_MODULES",
    "QUANTIZATION_SKIP_MODULES",
    "UNQUANTIZED_MODULES",
    "MiMoAudioDataCollator",
    "MiMoAudioLogProbs",
    "compute_logprobs",
    "get_lora_target_modules",
]
