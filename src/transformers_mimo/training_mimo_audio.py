"""Fine-tuning helpers for MiMo-Audio: LoRA target presets and the SFT data collator. (What quantization leaves alone
is in `quantization_mimo_audio`; the teacher-forced log-probabilities for RL, `compute_logprobs`, in
`modeling_mimo_audio`.)

Training data follows the official recipe: every position outside the assistant replies is ignored on all channels
(system and user turns, the `<|im_start|>assistant\\n` header and, when thinking is off, the empty thinking block
`<think>\\n\\n</think>\\n`); each assistant reply and its closing `<|im_end|>\\n` are trained, text and audio.
"""

from typing import Any

import torch

from .modeling_mimo_audio import IGNORE_INDEX
from .prompting_mimo_audio import ASSISTANT_TURN_START, THINK_SKIPPED, TURN_END


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

        self.assistant_header = encode(ASSISTANT_TURN_START)
        self.empty_thinking = encode(THINK_SKIPPED)
        self.turn_end = encode(TURN_END)

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


__all__ = [
    "LORA_TARGET_MODULES",
    "MiMoAudioDataCollator",
    "get_lora_target_modules",
]
