"""MiMo-Audio's prompt layouts and tasks: the one module that knows how prompts look.

- Layout constants: the chat turns, the thinking blocks and the fixed instructions the original models were trained
  with (the special tokens themselves are `SPECIAL_TOKENS` of `conversion_mapping_mimo_audio`).
- Typed prompt pieces: [`TextPiece`] (text tokenized on its own, as the original tokenizes every segment),
  [`SpeechPiece`] (`<|sosp|>` patches `<|eosp|>`) and [`SpeechStreamPiece`] (the assistant speech stream:
  `<|sostm|>`, text chunks of 5 tokens interleaved with 5 patches, `<|eot|>`, `<|eostm|>`), turned into model
  positions by [`expand_pieces`].
- Message validation ([`check_conversation`], [`check_audio_item`], [`as_audio_item`]).
- The task registry [`TASKS`]: one [`MiMoAudioTask`] per task of the original code, with its prompt builder, output
  modality, thinking flag, stop tokens and text / audio sampling. The processor's task methods, `generation_kwargs`,
  the CLI and the docs read it.
- The layout read backwards, for decoding generations: where an answer's text ends ([`answer_text_end`]), where its
  speech is ([`speech_stream_span`]) and how its text is cleaned ([`clean_answer_text`]).

Nothing here needs a model or a tokenizer: text is tokenized by the callable the processor passes to `expand_pieces`.
"""

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

from .conversion_mapping_mimo_audio import SPECIAL_TOKENS
from .generation_mimo_audio import ORIGINAL_AUDIO_SAMPLING, ORIGINAL_TEXT_SAMPLING


# ----------------------------------------------------------------------------------------------------------------------
# Layout constants
# ----------------------------------------------------------------------------------------------------------------------

TURN_START = "<|im_start|>{role}\n"
TURN_END = "<|im_end|>\n"
ASSISTANT_TURN_START = TURN_START.format(role="assistant")
THINK_OPEN = "<think>\n"  # the assistant reasons first
THINK_CLOSE = "</think>\n"
THINK_SKIPPED = "<think>\n\n</think>\n"  # text answer without reasoning

# Fixed instructions the original models were trained with.
TTS_STYLE_SYSTEM_PROMPT = "你需要根据指定的风格指令和文本内容来生成语音。"
TTS_VOICE_SYSTEM_PROMPT = "你需要根据指定的风格指令和文本内容来生成和语音prompt具有相同音色的语音。你的音色应该是："
DIALOGUE_VOICE_SYSTEM_PROMPT = "Your voice should be:"
DIALOGUE_SYSTEM_PROMPT_SEPARATOR = "\n\n"
ICL_INSTRUCTION = "[Int]:{instruction}\n"
ICL_AFTER_INPUT = "\n"
ICL_AFTER_EXAMPLE = " \n\n"

# Default task instructions. The original draws one at random from a list per call; we use one fixed sentence of
# that list per task (and language, for TTS). Every helper takes `instruction=` to use any other sentence.
DEFAULT_ASR_INSTRUCTION = "Please convert the recording to written format"
DEFAULT_TTS_INSTRUCTION = {"en": "Please convert this text to speech", "zh": "请将这段文字转换为语音"}

# MiMo-V2.5-ASR: the ASR answer opens with a language tag (plain text, after the empty thinking block), and without an
# explicit instruction one is drawn with `random.choice` from the sentences of that language (from both lists when no
# language is given), as the original's `get_asr_sft_prompt` does. These are the sentences of its template lists
# (XiaomiMiMo/MiMo-V2.5-ASR, MIT, src/mimo_audio/templates.py), in its order: the model was trained with them, and the
# order decides which one a seeded draw picks.
V25_LANGUAGE_TAGS = {None: "", "zh": "<chinese>", "en": "<english>"}
V25_ASR_INSTRUCTIONS = {
    "zh": (
        "请将这段语音转换为文字",
        "帮我识别这个音频文件中的内容",
        "把这段录音转成文本",
        "请转录这段语音",
        "将音频内容转换成文字格式",
        "识别并转写这段语音",
        "把语音内容写成文字",
        "转录这个音频片段",
        "将这段对话转换为文本",
        "麻烦帮我把这段录音整理成详细的文字记录",
    ),
    "en": (
        "Please transcribe this audio file",
        "Convert this speech recording to text",
        "Transcribe the following voice message",
        "Turn this audio into readable text",
        "Please convert the recording to written format",
        "Transcribe what you hear in this audio",
        "Convert this spoken content to text",
        "Please write down what is said in this recording",
        "Transcribe this voice recording",
        "Could you please help me transcribe this important recording?",
        "Would you mind converting this voice message into a readable text format?",
        "I'd really appreciate it if you could turn this audio file into a written document",
    ),
}
# The instructions a MiMo-V2.5-ASR prompt draws from, per language (both lists, Chinese first, without one).
V25_ASR_INSTRUCTION_POOLS = {None: V25_ASR_INSTRUCTIONS["zh"] + V25_ASR_INSTRUCTIONS["en"], **V25_ASR_INSTRUCTIONS}

# Assistant speech stream: text chunks of this many tokens interleaved with audio chunks of this many patches.
STREAM_TEXT_CHUNK = 5
STREAM_AUDIO_CHUNK = 5

# Where a generated answer's text ends: at the first of these tokens or the tokenizer's end-of-text / padding (the
# stop token, which the original drops with the last generated position). A speech answer also ends at `<|eostm|>`.
ANSWER_END_TOKENS = ("im_end_token",)
# Tokens the original removes from decoded answers.
ANSWER_CLEANUP_TOKENS = (SPECIAL_TOKENS["empty_token"], SPECIAL_TOKENS["eot_token"], SPECIAL_TOKENS["eostm_token"])


# ----------------------------------------------------------------------------------------------------------------------
# Typed prompt pieces
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TextPiece:
    """Text tokenized on its own (the original tokenizes every prompt segment separately)."""

    text: str


@dataclass
class SpeechPiece:
    """An audio clip as patches, framed by `<|sosp|>` and (unless `open_end`) `<|eosp|>`."""

    audio: dict
    open_end: bool = False


@dataclass
class SpeechStreamPiece:
    """Speech with its transcript: `<|sostm|>`, text/patch chunks, `<|eot|>` after the text, `<|eostm|>`."""

    text: str
    audio: dict


def text_item(text: str) -> dict:
    """A text content item of a chat message."""
    return {"type": "text", "text": text}


def generation_prompt(output_modality: str, thinking: bool, language_tag: str = "") -> list:
    """How the assistant turn opens when the model is asked to answer (a V2.5-ASR language tag ends the opening)."""
    if thinking:
        ending = THINK_OPEN
    elif output_modality == "audio":
        ending = SPECIAL_TOKENS["sostm_token"]
    else:
        ending = THINK_SKIPPED + language_tag
    return [TextPiece(ASSISTANT_TURN_START), TextPiece(ending)]


def render_turn(role: str, items: list[dict], thinking: str | None = None) -> list:
    """
    One chat turn: `<|im_start|>role\n`, its content in order, `<|im_end|>\n`. An assistant turn may open with a
    thinking block (`thinking`: `""` for the empty block of a text answer without reasoning, else the reasoning),
    as the generation prompts do; earlier turns of the original's multi-turn prompts have none.
    """
    pieces = [TextPiece(TURN_START.format(role=role))]
    if thinking == "":
        pieces.append(TextPiece(THINK_SKIPPED))
    elif thinking is not None:
        pieces += [TextPiece(THINK_OPEN), TextPiece(thinking), TextPiece(THINK_CLOSE)]
    if role == "assistant" and any(item["type"] == "audio" for item in items):
        texts = [item["text"] for item in items if item["type"] == "text"]
        audios = [item for item in items if item["type"] == "audio"]
        if len(texts) != 1 or len(audios) != 1 or not texts[0].strip():
            raise ValueError(
                "An assistant turn with audio must hold exactly one audio item and one non-empty text item (its "
                f"transcript), got {len(audios)} audio and {len(texts)} text items."
            )
        pieces.append(SpeechStreamPiece(texts[0], audios[0]))
    else:
        pieces.extend(TextPiece(item["text"]) if item["type"] == "text" else SpeechPiece(item) for item in items)
    pieces.append(TextPiece(TURN_END))
    return pieces


def render_conversation(
    conversation: list[dict], add_generation_prompt: bool, output_modality: str, thinking: bool, language_tag: str = ""
) -> list:
    """The pieces of a checked conversation (see `check_conversation`), then the answer's opening when asked."""
    pieces = []
    for message in conversation:
        pieces.extend(render_turn(message["role"], message["content"], message.get("thinking")))
    if add_generation_prompt:
        pieces.extend(generation_prompt(output_modality, thinking, language_tag))
    return pieces


def expand_pieces(pieces: list, tokenize: Callable[[str], list[int]], patches: Iterator[torch.Tensor], ids) -> list:
    """
    Positions of one prompt as segments `(text ids, patches or None)`: text pieces tokenized on their own, speech as
    `<|sosp|>` + patches (`<|empty|>` in the text channel) + `<|eosp|>`, and the assistant speech stream as
    `<|sostm|>`, (5 text tokens, 5 patches) pairs while both last, then the rest of the longer one, `<|eostm|>`,
    with `<|eot|>` after the last text token (the original's streaming segment).

    `patches` yields the patches `(num_patches, group_size, channels)` of the audio pieces in order; `ids` has the
    special token ids (`sosp_token_id`, ...).
    """
    segments = []

    def text(token_ids):
        if token_ids:
            segments.append((token_ids, None))

    def speech(clip):
        segments.append(([ids.empty_token_id] * clip.shape[0], clip))

    for piece in pieces:
        if isinstance(piece, TextPiece):
            text(tokenize(piece.text))
        elif isinstance(piece, SpeechPiece):
            text([ids.sosp_token_id])
            speech(next(patches))
            if not piece.open_end:
                text([ids.eosp_token_id])
        else:
            text_ids = tokenize(piece.text)
            if not text_ids:
                raise ValueError("The transcript of an assistant speech turn tokenizes to nothing.")
            text_ids = text_ids + [ids.eot_token_id]
            text_chunks = [text_ids[i : i + STREAM_TEXT_CHUNK] for i in range(0, len(text_ids), STREAM_TEXT_CHUNK)]
            audio_chunks = next(patches).split(STREAM_AUDIO_CHUNK)
            text([ids.sostm_token_id])
            for index in range(max(len(text_chunks), len(audio_chunks))):
                if index < len(text_chunks):
                    text(text_chunks[index])
                if index < len(audio_chunks):
                    speech(audio_chunks[index])
            text([ids.eostm_token_id])
    return segments


# ----------------------------------------------------------------------------------------------------------------------
# Message validation
# ----------------------------------------------------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")
_AUDIO_SOURCES = ("path", "url", "audio", "audio_codes")


def check_audio_item(item, where: str) -> dict:
    """Validate an audio content item (exactly one source, known keys); returns it with `"type": "audio"`."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: an audio item must be a dict, got {type(item).__name__}.")
    sources = [key for key in _AUDIO_SOURCES if item.get(key) is not None]
    if len(sources) != 1:
        raise ValueError(
            f"{where}: an audio item needs exactly one of {list(_AUDIO_SOURCES)}, got {sources or 'none'}."
        )
    unknown = set(item) - {"type", "sampling_rate", *_AUDIO_SOURCES}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} in audio item.")
    if "sampling_rate" in item and sources[0] != "audio":
        raise ValueError(f"{where}: `sampling_rate` only applies to an `audio` waveform, not to `{sources[0]}`.")
    return {"type": "audio", **item}


def check_conversation(conversation, index: int) -> list[dict]:
    """Validate one conversation and return it with string contents turned into text items."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"Conversation {index} must be a non-empty list of messages, got {conversation!r:.80}.")
    checked = []
    for position, message in enumerate(conversation):
        where = f"Conversation {index}, message {position}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: a message must be a dict with `role` and `content`, got {message!r:.80}.")
        unknown = set(message) - {"role", "content", "thinking"}
        if unknown:
            raise ValueError(f"{where}: unknown message keys {sorted(unknown)}.")
        role, content = message["role"], message["content"]
        if role not in _ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {list(_ROLES)}.")
        thinking = message.get("thinking")
        if thinking is not None and (role != "assistant" or not isinstance(thinking, str)):
            raise ValueError(f"{where}: `thinking` must be a string and only goes in assistant messages.")
        if isinstance(content, str):
            content = [text_item(content)]
        if not isinstance(content, (list, tuple)) or not content:
            raise ValueError(f"{where}: `content` must be a string or a non-empty list of items, got {content!r:.80}.")
        items = []
        for item in content:
            if not isinstance(item, dict) or "type" not in item:
                raise ValueError(f"{where}: a content item must be a dict with a `type`, got {item!r:.80}.")
            if item["type"] == "text":
                if not isinstance(item.get("text"), str) or set(item) != {"type", "text"}:
                    raise ValueError(
                        f"{where}: a text item must be {{'type': 'text', 'text': <str>}}, got {item!r:.80}."
                    )
                items.append(item)
            elif item["type"] == "audio":
                items.append(check_audio_item(item, where))
            else:
                raise ValueError(f"{where}: unknown content type {item['type']!r}; expected 'text' or 'audio'.")
        checked.append({"role": role, "content": items, "thinking": thinking})
    return checked


def as_audio_item(audio, name: str) -> dict:
    """Helper inputs: a path, a content item dict, a `(waveform, sampling_rate)` tuple or a waveform at 24 kHz."""
    if isinstance(audio, (str, os.PathLike)):
        return {"type": "audio", "path": os.fspath(audio)}
    if isinstance(audio, dict):
        return check_audio_item(audio, f"`{name}`")
    if isinstance(audio, tuple) and len(audio) == 2:
        return {"type": "audio", "audio": audio[0], "sampling_rate": audio[1]}
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return {"type": "audio", "audio": audio}
    raise ValueError(
        f"`{name}` must be a file path, an audio item dict, a (waveform, sampling_rate) tuple or a waveform array, "
        f"got {type(audio).__name__}."
    )


def as_audio_items(audio, name: str = "audio") -> list[dict]:
    """One audio input or a list of them (a batch) -> audio items."""
    return [as_audio_item(clip, name) for clip in (audio if is_batch(audio) else [audio])]


def is_batch(value) -> bool:
    """Helper inputs: a list holds one input per sample (a tuple is one `(waveform, sampling_rate)` audio)."""
    return isinstance(value, list)


def is_conversation_batch(conversation) -> bool:
    """Whether `conversation` is a list of conversations rather than one list of messages."""
    return (
        isinstance(conversation, (list, tuple))
        and len(conversation) > 0
        and isinstance(conversation[0], (list, tuple))
    )


# ----------------------------------------------------------------------------------------------------------------------
# Per-task prompt builders: one sample's inputs -> its chat prompt (instruct model) or its pieces (base model)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ChatPrompt:
    r"""
    A chat prompt before layout: the messages, and how the answer opens after them (see `generation_prompt`).

    Args:
        messages (`list[dict]`): the turns, in the format `check_conversation` accepts.
        thinking (`bool`): open the answer with `<think>\n` (the model reasons first).
        language_tag (`str`): MiMo-V2.5-ASR's language tag that ends a text answer's opening (`V25_LANGUAGE_TAGS`).
    """

    messages: list[dict]
    thinking: bool = False
    language_tag: str = ""


def _contains_chinese(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


def _tts_text(text: str) -> str:
    """The original's TTS text normalization: a text in one letter case only is capitalized ("HELLO" -> "Hello")."""
    return text.capitalize() if text.isupper() or text.islower() else text


def build_asr_prompt(audio: dict, instruction: str, language: str | None = None) -> ChatPrompt:
    """Speech recognition: the user turn is the audio then the instruction (V2.5-ASR: the answer opens with a tag)."""
    messages = [{"role": "user", "content": [audio, text_item(instruction)]}]
    return ChatPrompt(messages, language_tag=V25_LANGUAGE_TAGS[language])


def build_tts_prompt(
    text: str, instruction: str | None, style: str | None, voice: dict | None, natural: bool
) -> ChatPrompt:
    """
    Text to speech: `"{instruction}: {text}"` (plus `"({style})"`), or the free-form request alone (`natural`); a
    style or a free-form request adds the style system prompt, a voice prompt the voice system turn. The assistant
    thinks first when there is a style, a voice or a free-form request.
    """
    text = _tts_text(text)
    if instruction is None:
        instruction = DEFAULT_TTS_INSTRUCTION["zh" if _contains_chinese(text) else "en"]
    if natural:
        request = text
    else:
        request = f"{instruction}: {text}" + (f"({style})" if style is not None else "")
    messages = [{"role": "user", "content": [text_item(request)]}]
    if voice is not None:
        messages.insert(0, {"role": "system", "content": [text_item(TTS_VOICE_SYSTEM_PROMPT), voice]})
    elif style is not None or natural:
        messages.insert(0, {"role": "system", "content": [text_item(TTS_STYLE_SYSTEM_PROMPT)]})
    return ChatPrompt(messages, thinking=voice is not None or style is not None or natural)


def build_audio_understanding_prompt(audio: dict, question: str, thinking: bool = False) -> ChatPrompt:
    """A question about the audio: the user turn is the audio then the question; the answer is text."""
    return ChatPrompt([{"role": "user", "content": [audio, text_item(question)]}], thinking=thinking)


def build_text_dialogue_prompt(conversation: list[dict], thinking: bool = False) -> ChatPrompt:
    """Text chat: the messages as they are."""
    return ChatPrompt(conversation, thinking=thinking)


def build_spoken_dialogue_prompt(
    conversation: list[dict], system_prompt: str | None, voice: dict | None
) -> ChatPrompt:
    """The original's spoken dialogue: the voice prompt is a system turn, the system prompt opens the first user turn."""
    messages = [dict(message) for message in conversation]
    if system_prompt is not None:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("`system_prompt` needs a user turn to go into, but the conversation has none.")
        first_user["content"] = [
            text_item(system_prompt),
            text_item(DIALOGUE_SYSTEM_PROMPT_SEPARATOR),
        ] + list(first_user["content"])
    if voice is not None:
        messages.insert(0, {"role": "system", "content": [text_item(DIALOGUE_VOICE_SYSTEM_PROMPT), voice]})
    return ChatPrompt(messages)


def build_in_context_learning_prompt(audio: dict, examples: list[dict], instruction: str) -> list:
    """Few-shot speech-to-speech prompt of the base model (no chat turns); the answer is a speech stream."""
    pieces = [TextPiece(ICL_INSTRUCTION.format(instruction=instruction))]
    for example in examples:
        pieces += [
            SpeechPiece(example["input_audio"]),
            TextPiece(ICL_AFTER_INPUT),
            SpeechStreamPiece(example["output_text"], example["output_audio"]),
            TextPiece(ICL_AFTER_EXAMPLE),
        ]
    pieces += [SpeechPiece(audio), TextPiece(ICL_AFTER_INPUT), TextPiece(SPECIAL_TOKENS["sostm_token"])]
    return pieces


def build_speech_continuation_prompt(audio: dict) -> list:
    """Base-model speech continuation: the prompt speech segment is left open (no `<|eosp|>`)."""
    return [SpeechPiece(audio, open_end=True)]


# ----------------------------------------------------------------------------------------------------------------------
# Task registry
# ----------------------------------------------------------------------------------------------------------------------

# How the original generates each task's answer (its per-task stoppers and samplers, `MimoAudio.*_sft` and
# `task_sampler_configs`). Every task of the original samples audio with its default (`ORIGINAL_AUDIO_SAMPLING`:
# temperature 0.9, top-p 0.95). A top-k of 0 is "no top-k" (None would be filled in from a checkpoint's stored
# generation config). Read-only: the entries share them.
_AUDIO_SAMPLING = MappingProxyType({**ORIGINAL_AUDIO_SAMPLING, "audio_top_k": 0})
_GREEDY = MappingProxyType({"do_sample": False})


def _sampling(temperature: float, top_p: float) -> Mapping:
    """Text sampling `generate` arguments (no top-k)."""
    return MappingProxyType({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p})


@dataclass(frozen=True)
class MiMoAudioTask:
    r"""
    One task: how its prompt is laid out and how the original generates its answer.

    Args:
        build_prompt (`Callable`): one sample's inputs (audio as checked audio items) -> a [`ChatPrompt`] (instruct
            model: laid out as chat turns, then the answer's opening) or a list of pieces (base model, laid out as
            they are).
        output_modality (`"text"` or `"audio"`): what the model answers with; a chat answer in audio opens with
            `<|sostm|>`, one in text with the empty thinking block (or `<think>\n` when it reasons first).
        thinking (`bool`): whether the model may reason before answering, i.e. whether the builder may return a
            prompt with `thinking=True`.
        stop_tokens (`tuple[str, ...]`): the `SPECIAL_TOKENS` / `CHAT_TOKENS` names generation stops at, besides
            the tokenizer's end-of-text.
        text_sampling, audio_sampling (`Mapping`): the text and audio sampling `generate` arguments (audio: the
            original's 0.9 temperature and 0.95 top-p by default).
    """

    build_prompt: Callable[..., "ChatPrompt | list"]
    output_modality: str
    thinking: bool
    stop_tokens: tuple[str, ...]
    text_sampling: Mapping
    audio_sampling: Mapping = field(default_factory=lambda: _AUDIO_SAMPLING)

    def prompt_pieces(self, index: int = 0, **inputs) -> list:
        """
        The pieces of one sample's prompt, ending with the opening of the answer. `inputs` go to `build_prompt`; a chat
        prompt's messages are checked (`check_conversation`, `index` numbers the sample in errors).
        """
        prompt = self.build_prompt(**inputs)
        if not isinstance(prompt, ChatPrompt):
            return prompt
        if prompt.thinking and not self.thinking:
            raise ValueError("This task's answer does not open with reasoning (`thinking=True`).")
        return render_conversation(
            check_conversation(prompt.messages, index),
            add_generation_prompt=True,
            output_modality=self.output_modality,
            thinking=prompt.thinking,
            language_tag=prompt.language_tag,
        )


# One entry per task; the key is the processor method's name (`"speech_to_text_dialogue"` is `spoken_dialogue(...,
# output_modality="text")`). Speech continuation has no builder in the original: it ends where the open speech segment
# would be closed, at `<|eosp|>`, and samples with the original's defaults for other tasks (`ORIGINAL_TEXT_SAMPLING`,
# audio top-k 50).
_TEXT_ANSWER = ("im_end_token",)
_SPEECH_ANSWER = ("eostm_token", "im_end_token")
TASKS = {
    # name: MiMoAudioTask(prompt builder, output modality, thinking, stop tokens, text sampling[, audio sampling])
    "asr": MiMoAudioTask(build_asr_prompt, "text", False, _TEXT_ANSWER, _GREEDY),
    "audio_understanding": MiMoAudioTask(
        build_audio_understanding_prompt, "text", True, _TEXT_ANSWER, _sampling(0.3, 0.95)
    ),
    "text_dialogue": MiMoAudioTask(build_text_dialogue_prompt, "text", True, _TEXT_ANSWER, _sampling(0.4, 0.95)),
    "speech_to_text_dialogue": MiMoAudioTask(
        build_spoken_dialogue_prompt, "text", False, _TEXT_ANSWER, _sampling(0.6, 0.95)
    ),
    "tts": MiMoAudioTask(build_tts_prompt, "audio", True, _SPEECH_ANSWER, _sampling(0.6, 1.0)),
    "spoken_dialogue": MiMoAudioTask(
        build_spoken_dialogue_prompt, "audio", False, _SPEECH_ANSWER, _sampling(0.6, 0.95)
    ),
    "in_context_learning": MiMoAudioTask(build_in_context_learning_prompt, "audio", False, ("eostm_token",), _GREEDY),
    "speech_continuation": MiMoAudioTask(
        build_speech_continuation_prompt,
        "audio",
        False,
        ("eosp_token",),
        MappingProxyType(ORIGINAL_TEXT_SAMPLING),
        MappingProxyType({**ORIGINAL_AUDIO_SAMPLING, "audio_top_k": 50}),
    ),
}


def get_task(name: str) -> MiMoAudioTask:
    """The registry entry of `name`, or a `ValueError` listing the tasks."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; expected one of {sorted(TASKS)}.")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------------------------------
# The layout read backwards: decoding generated answers
# ----------------------------------------------------------------------------------------------------------------------


def answer_text_end(text_ids: torch.Tensor, stop_ids: list[int]) -> int:
    """Index of the first stop token in generated ids `(length,)` (`length` when there is none)."""
    hits = torch.isin(text_ids, torch.tensor(stop_ids)).nonzero()
    return int(hits[0, 0]) if hits.numel() else text_ids.shape[0]


def speech_stream_span(text_ids: torch.Tensor, sostm_token_id: int, eostm_token_id: int) -> tuple[int, int]:
    """
    `(start, end)` of the speech in generated ids `(length,)`: after the first `<|sostm|>` (or from the start) and
    before the first `<|eostm|>` (or to the end); `start >= end` when there is none.
    """
    starts = (text_ids == sostm_token_id).nonzero()
    ends = (text_ids == eostm_token_id).nonzero()
    start = int(starts[0, 0]) + 1 if starts.numel() else 0
    end = int(ends[0, 0]) if ends.numel() else text_ids.shape[0]
    return start, end


def clean_answer_text(text: str, model_variant: str = "mimo-audio") -> str:
    """
    A decoded answer cleaned as the original does: `<|empty|>`, `<|eot|>` and `<|eostm|>` removed, then stripped
    (MiMo-V2.5-ASR: `clean_v25_transcript`).
    """
    if model_variant == "mimo-v2.5-asr":
        return clean_v25_transcript(text)
    for token in ANSWER_CLEANUP_TOKENS:
        text = text.replace(token, "")
    return text.strip()


def clean_v25_transcript(text: str) -> str:
    """
    MiMo-V2.5-ASR's transcript cleanup, in the original's order: strip, remove `<|empty|>`, `<|eot|>` and
    `<|eostm|>`, then, when a language tag is left, remove `<chinese>` / `<english>` and strip again.
    """
    text = text.strip()
    for token in ANSWER_CLEANUP_TOKENS:
        text = text.replace(token, "")
    tags = [tag for tag in V25_LANGUAGE_TAGS.values() if tag]
    if any(tag in text for tag in tags):
        for tag in tags:
            text = text.replace(tag, "")
        text = text.strip()
    return text
