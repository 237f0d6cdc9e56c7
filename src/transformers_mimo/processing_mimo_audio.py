"""Processor for MiMo-Audio: chat messages -> model inputs, generated ids -> text and waveforms.

The model reads one LLM position per text token or per audio patch (`group_size` frames of `audio_channels` codes):

- `input_ids` `(batch, seq_len)`: the text channel; audio-patch positions hold `<|empty|>`.
- `audio_input_ids` `(batch, seq_len, group_size, audio_channels)`: the patches; text positions hold each channel's
  empty id.
- `attention_mask` `(batch, seq_len)`: batches are padded on the LEFT.

How prompts look (chat turns, speech segments, the assistant speech stream, the per-task prompts) and how each task
is generated live in `prompting_mimo_audio.py`; the processor turns those layouts into tensors, encodes audio with
the codec and decodes generations.
"""

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import PROCESSOR_NAME, cached_file, logging

from .audio_utils import read_audio, resample_waveform
from .configuration_mimo_audio import MODEL_VARIANTS, MiMoAudioConfig, default_audio_empty_ids
from .conversion_mapping_mimo_audio import CHAT_TOKENS, SPECIAL_TOKENS
from .feature_extraction_mimo_audio import MiMoAudioFeatureExtractor
from .modeling_mimo_audio_tokenizer import MiMoAudioTokenizerModel
from .prompting_mimo_audio import (
    ANSWER_END_TOKENS,
    DEFAULT_ASR_INSTRUCTION,
    V25_ASR_INSTRUCTION_POOLS,
    V25_LANGUAGE_TAGS,
    SpeechPiece,
    TextPiece,
    answer_text_end,
    as_audio_item,
    as_audio_items,
    check_conversation,
    clean_answer_text,
    expand_pieces,
    get_task,
    is_batch,
    is_conversation_batch,
    render_conversation,
    speech_stream_span,
)


logger = logging.get_logger(__name__)

__all__ = ["MiMoAudioDecodedOutput", "MiMoAudioProcessor"]


# MiMo-V2.5-ASR encodes audio in waveform chunks of this many seconds, each with its own log-mel.
V25_CHUNK_SECONDS = 30
# Quantizers of the released MiMo-Audio-Tokenizer: precomputed `audio_codes` with more rows are (frames, quantizers).
MAX_CODEC_QUANTIZERS = 20


def _feature_extractor_for(codec: MiMoAudioTokenizerModel | None) -> MiMoAudioFeatureExtractor:
    """The log-mel settings the codec was trained with (the released codec's defaults without one)."""
    if codec is None:
        return MiMoAudioFeatureExtractor()
    return MiMoAudioFeatureExtractor.from_audio_tokenizer_config(codec.config)


class MiMoAudioProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {
        "text_kwargs": {"padding": True, "padding_side": "left", "add_special_tokens": False},
        "common_kwargs": {"return_tensors": "pt"},
    }


@dataclass
class MiMoAudioDecodedOutput:
    """Decoded generations.

    Args:
        text (`list[str]`): the text channel of each sample, cleaned as the original does.
        audio (`list[torch.Tensor | None]`): the waveform `(samples,)` (float32, CPU) of the speech each sample
            generated, or `None` when it generated no speech or no audio was decoded.
        sampling_rate (`int`): rate of `audio` in Hz.
    """

    text: list[str]
    audio: list[torch.Tensor | None]
    sampling_rate: int


class MiMoAudioProcessor(ProcessorMixin):
    r"""
    Builds MiMo-Audio model inputs from chat messages and turns generated ids back into text and speech.

    Audio goes through the feature extractor (downmix, resampling to 24 kHz, log-mel) and the audio tokenizer (the
    codec, `MiMoAudioTokenizerModel`), which gives `audio_channels` codes per 25 Hz frame; the frame count is padded to
    a multiple of `group_size` by repeating the last frame (as the original does) and grouped into patches.

    Args:
        feature_extractor ([`MiMoAudioFeatureExtractor`]): waveform -> log-mel features.
        tokenizer ([`PreTrainedTokenizerBase`]): the Qwen2 text tokenizer. MiMo-Audio's special tokens (`<|sosp|>`,
            `<|eosp|>`, `<|empty|>`, `<|Human|>`, `<|SpeechLM|>`, `<|sostm|>`, `<|eostm|>`, `<|eot|>`) are added when
            missing, as in the original.
        audio_tokenizer ([`MiMoAudioTokenizerModel`], *optional*): the codec. Needed for audio given as waveforms or
            files and for decoding speech; audio given as codes (`{"type": "audio", "audio_codes": ...}`) works without
            it. `save_pretrained` writes it to the `audio_tokenizer/` subfolder and `from_pretrained` loads it from
            there.
        group_size (`int`, *optional*, defaults to 4): frames per patch (the model config's `group_size`).
        audio_channels (`int`, *optional*, defaults to 8): codebooks read by the model (`audio_channels`).
        audio_empty_ids (`list[int]`, *optional*): each channel's empty id (the model config's `audio_empty_ids`);
            defaults to the released checkpoints' `[1024, 1024, 128, ...]`.
        model_variant (`str`, *optional*, defaults to `"mimo-audio"`): the model config's `model_variant`. With
            `"mimo-v2.5-asr"` audio is encoded with MiMo-V2.5-ASR's recipe (30 s waveform chunks, see
            `encode_audio`), `asr` takes a `language`, and decoded text is cleaned as that release's ASR does.
    """

    valid_processor_kwargs = MiMoAudioProcessorKwargs

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        audio_tokenizer=None,
        group_size: int = 4,
        audio_channels: int = 8,
        audio_empty_ids: list[int] | None = None,
        model_variant: str = "mimo-audio",
    ):
        if model_variant not in MODEL_VARIANTS:
            raise ValueError(f"`model_variant` must be one of {list(MODEL_VARIANTS)}, got {model_variant!r}.")
        if audio_empty_ids is None:
            audio_empty_ids = default_audio_empty_ids(audio_channels)
        if group_size < 1 or audio_channels < 1:
            raise ValueError(f"`group_size` ({group_size}) and `audio_channels` ({audio_channels}) must be positive.")
        if len(audio_empty_ids) != audio_channels:
            raise ValueError(f"`audio_empty_ids` has {len(audio_empty_ids)} entries, expected {audio_channels}.")
        super().__init__(feature_extractor, tokenizer, audio_tokenizer=audio_tokenizer)
        self.audio_tokenizer = audio_tokenizer
        self.group_size = group_size
        self.audio_channels = audio_channels
        self.audio_empty_ids = [int(value) for value in audio_empty_ids]
        self.model_variant = model_variant

        missing = [token for token in SPECIAL_TOKENS.values() if token not in tokenizer.get_vocab()]
        if missing:
            logger.warning(f"Adding missing MiMo-Audio special tokens to the tokenizer: {missing}")
            tokenizer.add_tokens(missing, special_tokens=True)
        for name, token in {**SPECIAL_TOKENS, **CHAT_TOKENS}.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"The tokenizer has no {token} token, which MiMo-Audio prompts need.")
            setattr(self, f"{name}_id", token_id)
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer needs a pad token (MiMo-Audio uses <|endoftext|>).")

    # ---------------------------------------------------------------- Transformers plumbing for an out-of-tree codec

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "audio_tokenizer":
            if not isinstance(argument, MiMoAudioTokenizerModel):
                raise TypeError(f"`audio_tokenizer` must be a MiMoAudioTokenizerModel, got {type(argument).__name__}.")
            return MiMoAudioTokenizerModel
        return super().check_argument_for_proper_class(argument_name, argument)

    @staticmethod
    def get_possibly_dynamic_module(module_name):
        if module_name == "MiMoAudioTokenizerModel":
            return MiMoAudioTokenizerModel
        if module_name == "MiMoAudioFeatureExtractor":
            return MiMoAudioFeatureExtractor
        return ProcessorMixin.get_possibly_dynamic_module(module_name)

    def to_dict(self):
        # The codec is saved as a model in the `audio_tokenizer/` subfolder, not referenced in the config (and not
        # deep-copied by `ProcessorMixin.to_dict`).
        codec = self.__dict__.pop("audio_tokenizer")
        try:
            return super().to_dict()
        finally:
            self.audio_tokenizer = codec

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the tokenizer and `processor_config.json` as usual, plus the codec in `audio_tokenizer/`."""
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if self.audio_tokenizer is not None:
            self.audio_tokenizer.save_pretrained(os.path.join(save_directory, "audio_tokenizer"))
        return files

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, audio_tokenizer=None, device=None, dtype=None, **kwargs
    ) -> "MiMoAudioProcessor":
        """
        Load the processor from a directory or Hub repo.

        With a `processor_config.json` (written by `save_pretrained`) the processor is restored as saved. Without one,
        i.e. from a model checkpoint (converted or original MiMo-Audio), the text tokenizer is loaded from it and
        `group_size`, `audio_channels` and `audio_empty_ids` are read from its `config.json`; the feature extractor
        follows the codec's config.

        Args:
            audio_tokenizer (`str`, `os.PathLike` or [`MiMoAudioTokenizerModel`], *optional*): the codec or where to
                load it from (e.g. an original "MiMo-Audio-Tokenizer" directory). Defaults to the `audio_tokenizer/`
                subfolder when there is one.
            device (`str` or `torch.device`, *optional*): where to put the codec (default: CPU).
            dtype (`torch.dtype` or `str`, *optional*): the codec's dtype (default, or `"auto"`: as saved).
        """
        if dtype == "auto":  # what pipelines pass
            dtype = None
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "local_files_only", "token", "revision")
            if key in kwargs
        }

        def find(filename, subfolder=""):
            return cached_file(
                pretrained_model_name_or_path,
                filename,
                subfolder=subfolder,
                _raise_exceptions_for_missing_entries=False,
                **hub_kwargs,
            )

        if isinstance(audio_tokenizer, (str, os.PathLike)):
            audio_tokenizer = MiMoAudioTokenizerModel.from_pretrained(audio_tokenizer, dtype=dtype, **hub_kwargs)
        elif audio_tokenizer is None and find("config.json", "audio_tokenizer") is not None:
            audio_tokenizer = MiMoAudioTokenizerModel.from_pretrained(
                pretrained_model_name_or_path, subfolder="audio_tokenizer", dtype=dtype, **hub_kwargs
            )
        if find(PROCESSOR_NAME) is not None:
            processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            if audio_tokenizer is not None:
                processor.audio_tokenizer = audio_tokenizer
        else:
            config = MiMoAudioConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
            processor = cls(
                _feature_extractor_for(audio_tokenizer),
                AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs),
                audio_tokenizer=audio_tokenizer,
                group_size=config.group_size,
                audio_channels=config.audio_channels,
                audio_empty_ids=config.audio_empty_ids,
                model_variant=config.model_variant,
            )
        if processor.audio_tokenizer is not None:
            if device is not None or dtype is not None:
                processor.audio_tokenizer.to(device=device, dtype=dtype)
            processor.audio_tokenizer.eval()
        return processor

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "audio_input_ids", "attention_mask"]

    @property
    def sampling_rate(self) -> int:
        """Rate in Hz of the waveforms the processor reads (after resampling) and writes."""
        return self.feature_extractor.sampling_rate

    # ------------------------------------------------------------------------------------------------ chat templates

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = True,
        output_modality: str = "text",
        thinking: bool = False,
        language: str | list[str | None] | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Lay out one conversation or a batch of conversations as model inputs.

        Messages follow Transformers' format: `{"role": "system" | "user" | "assistant", "content": str | list}` with
        content items `{"type": "text", "text": str}` and `{"type": "audio", <source>}`, where the source is one of
        `"path"` (a local audio file), `"url"`, `"audio"` (a waveform array, with an optional `"sampling_rate"`,
        default 24000) or `"audio_codes"` (precomputed codes `(num_quantizers, frames)` at 25 Hz).

        Each turn is `<|im_start|>{role}\n`, its items in order, `<|im_end|>\n`. An assistant message may carry
        `"thinking"`: `""` opens its turn with the empty block `<think>\n\n</think>\n` and any other string with
        `<think>\n{thinking}</think>\n` (use this for training samples, so that the answer follows the same opening as
        the generation prompt; earlier turns of the original's multi-turn prompts have no thinking block). A text item is tokenized on its own;
        an audio item becomes `<|sosp|>`, one position per patch, `<|eosp|>`. An assistant turn with one text and one
        audio item is the speech stream the model generates: `<|sostm|>`, then chunks of 5 text tokens alternating
        with chunks of 5 patches (`<|eot|>` closes the text), then `<|eostm|>`. An assistant audio item without its
        transcript is an error.

        Args:
            conversation: one list of messages, or a list of them (a batch, padded on the left).
            add_generation_prompt (`bool`, defaults to `True`): open the assistant turn at the end.
            output_modality (`"text"` or `"audio"`): what the assistant answers with. `"audio"` opens with
                `<|sostm|>`; `"text"` opens with an empty thinking block `<think>\n\n</think>\n`.
            thinking (`bool`, defaults to `False`): open with `<think>\n` instead, so the model reasons first (used
                for audio understanding with thinking and for TTS with a style instruction).
            language (`"zh"`, `"en"`, `None`, or a list with one per conversation): MiMo-V2.5-ASR only: end the
                text opening with the language tag `<chinese>` / `<english>` the model transcribes after (see `asr`).

        Returns:
            [`BatchFeature`] with `input_ids` `(batch, seq_len)`, `audio_input_ids`
            `(batch, seq_len, group_size, audio_channels)` and `attention_mask` `(batch, seq_len)` (int64 tensors).
        """
        # Transformers' pipelines pass these; `processor_kwargs` may carry `output_modality` / `thinking`.
        if kwargs.pop("continue_final_message", False):
            raise ValueError("MiMoAudioProcessor cannot continue a final assistant message; end with a user turn.")
        pipeline_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        output_modality = pipeline_kwargs.pop("output_modality", output_modality)
        thinking = pipeline_kwargs.pop("thinking", thinking)
        self._check_no_extra_kwargs({**kwargs, **pipeline_kwargs})
        if output_modality not in ("text", "audio"):
            raise ValueError(f"`output_modality` must be 'text' or 'audio', got {output_modality!r}.")
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("`conversation` must be a non-empty list of messages or a list of conversations.")
        conversations = conversation if is_conversation_batch(conversation) else [conversation]
        tags = self._language_tags(language, len(conversations))
        if any(tags) and (output_modality != "text" or thinking or not add_generation_prompt):
            raise ValueError(
                "`language` tags the text answer's opening: it needs `add_generation_prompt=True`, "
                "`output_modality='text'` and `thinking=False`."
            )
        batch = [
            render_conversation(
                check_conversation(conv, index), add_generation_prompt, output_modality, thinking, language_tag=tag
            )
            for index, (conv, tag) in enumerate(zip(conversations, tags))
        ]
        return self._build_inputs(batch)

    def _language_tags(self, language, count: int) -> list[str]:
        """One V2.5-ASR language tag per sample, from one language or a list of `count` languages."""
        if isinstance(language, (list, tuple)):
            if len(language) != count:
                raise ValueError(f"`language` has {len(language)} entries for {count} samples.")
            return [self._language_tag(item) for item in language]
        return [self._language_tag(language)] * count

    def _language_tag(self, language: str | None) -> str:
        """The V2.5-ASR language tag for `language`; errors for an unknown language or a model trained without tags."""
        if language is not None and self.model_variant != "mimo-v2.5-asr":
            raise ValueError(
                f"`language`={language!r} needs a MiMo-V2.5-ASR checkpoint; this processor is for "
                f"{self.model_variant!r}, which was not trained with language tags (leave `language=None`)."
            )
        if language not in V25_LANGUAGE_TAGS:
            raise ValueError(f"`language` must be 'zh', 'en' or None, got {language!r}.")
        return V25_LANGUAGE_TAGS[language]

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio=None,
        **kwargs: Unpack[MiMoAudioProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Model inputs from text with audio placeholders, as Transformers' audio-LM processors do. Chat prompts are
        easier to build with [`~MiMoAudioProcessor.apply_chat_template`] and the task helpers (`asr`, `tts`, ...).

        Each `audio_token` (`<|empty|>`) in the text stands for one clip of `audio`, in order: it is expanded to
        `<|sosp|>`, one position per patch of the clip (`<|empty|>` in the text channel, the codes in
        `audio_input_ids`), `<|eosp|>`. The text around it is tokenized as is (no special tokens are added).

        Args:
            text (`str` or `list[str]`): one prompt or a batch.
            audio (*optional*): the clips of all placeholders, in order (a list, or one clip for one placeholder).
                A clip is a waveform `(samples,)` or `(channels, samples)` at 24 kHz, a `(waveform, sampling_rate)`
                tuple, a file path, or an audio content item dict such as `{"type": "audio", "audio_codes": codes}`.
            kwargs: text kwargs `padding` (`True` / `"longest"`, the default, or `"max_length"` with `max_length`),
                always on the left, where generation needs it; `return_tensors` (`"pt"`, the only one supported).

        Returns:
            [`BatchFeature`] with `input_ids` `(batch, seq_len)`, `audio_input_ids`
            `(batch, seq_len, group_size, audio_channels)` and `attention_mask` `(batch, seq_len)`.
        """
        if text is None:
            raise ValueError("`text` is required: a prompt with one `audio_token` per clip of `audio`.")
        output_kwargs = self._merge_kwargs(
            MiMoAudioProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        if text_kwargs.get("return_tensors", "pt") not in (None, "pt"):
            raise ValueError(
                f"MiMoAudioProcessor returns torch tensors only (`return_tensors='pt'`), got "
                f"{text_kwargs['return_tensors']!r}."
            )
        if text_kwargs.get("padding_side", "left") != "left":
            raise ValueError("MiMoAudioProcessor pads on the left (generation needs it).")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(item, str) for item in texts):
            raise ValueError("`text` must be a string or a non-empty list of strings.")
        clips = [] if audio is None else (list(audio) if is_batch(audio) else [audio])
        placeholders = sum(item.count(self.audio_token) for item in texts)
        if placeholders != len(clips):
            raise ValueError(
                f"`text` has {placeholders} audio placeholder(s) (`{self.audio_token}`) but `audio` has {len(clips)} "
                "clip(s): give one clip per placeholder."
            )
        items = iter([as_audio_item(clip, "audio") for clip in clips])
        batch = []
        for item in texts:
            parts = item.split(self.audio_token)
            pieces = [TextPiece(parts[0])]
            for part in parts[1:]:
                pieces += [SpeechPiece(next(items)), TextPiece(part)]
            batch.append([piece for piece in pieces if not isinstance(piece, TextPiece) or piece.text])
        max_length = text_kwargs.get("max_length") if text_kwargs.get("padding") == "max_length" else None
        return self._build_inputs(batch, max_length=max_length)

    @property
    def audio_token(self) -> str:
        """The placeholder of one audio clip in the text given to `__call__`."""
        return SPECIAL_TOKENS["empty_token"]

    @staticmethod
    def _check_no_extra_kwargs(kwargs: dict):
        if kwargs.get("tokenize", True) is not True or kwargs.get("return_dict", True) is not True:
            raise ValueError("MiMoAudioProcessor always tokenizes and returns a BatchFeature of tensors.")
        if kwargs.get("return_tensors", "pt") != "pt":
            raise ValueError("MiMoAudioProcessor returns torch tensors only (`return_tensors='pt'`).")
        unknown = set(kwargs) - {"tokenize", "return_dict", "return_tensors"}
        if unknown:
            raise ValueError(f"Unexpected arguments: {sorted(unknown)}.")

    # ------------------------------------------------------------------------------------------------- task helpers

    def asr(
        self, audio, *, language: str | list[str | None] | None = None, instruction: str | None = None
    ) -> BatchFeature:
        """
        Speech recognition: the user turn is the audio then an instruction; the answer is text.

        Args:
            audio: a path, audio item, `(waveform, sampling_rate)` or waveform at 24 kHz; a list for a batch.
            language (`"zh"`, `"en"`, `None`, or a list with one per sample): MiMo-V2.5-ASR only. The assistant's
                opening ends with `<chinese>` / `<english>` (no tag for `None`: the model picks the language). A
                MiMo-Audio checkpoint was not trained with tags, so any value but `None` is an error there.
            instruction (`str`, *optional*): the request after the audio. By default MiMo-Audio uses
                `DEFAULT_ASR_INSTRUCTION`; MiMo-V2.5-ASR draws one sentence per sample with `random.choice` from
                `V25_ASR_INSTRUCTIONS[language]` (both lists, Chinese first, for `language=None`) as the original
                does, so `random.seed(n)` before the call reproduces the original's prompt for the same seed.
        """
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise ValueError(f"`instruction` must be a non-empty string or None, got {instruction!r:.80}.")
        items = as_audio_items(audio)
        languages = language if isinstance(language, (list, tuple)) else [language] * len(items)
        self._language_tags(languages, len(items))
        if instruction is not None:
            instructions = [instruction] * len(items)
        elif self.model_variant == "mimo-v2.5-asr":
            instructions = [random.choice(V25_ASR_INSTRUCTION_POOLS[item]) for item in languages]
        else:
            instructions = [DEFAULT_ASR_INSTRUCTION] * len(items)
        samples = zip(items, instructions, languages)
        return self._task_inputs("asr", [{"audio": a, "instruction": i, "language": lang} for a, i, lang in samples])

    def tts(
        self,
        text: str | list[str],
        instruction: str | None = None,
        style: str | None = None,
        voice=None,
        natural_instruction: bool = False,
    ) -> BatchFeature:
        """
        Text to speech (instruct model).

        Args:
            text: the text to read (a list for a batch). As in the original, a text in one letter case only is
                capitalized first.
            instruction: the request put before the text (`"{instruction}: {text}"`); defaults to
                `DEFAULT_TTS_INSTRUCTION` for the text's language (Chinese or English).
            style: a style instruction, e.g. "用小孩子的声音开心的说" (`"{instruction}: {text}({style})"`, with the
                style system prompt; the assistant thinks first).
            voice: a voice prompt (path, audio item, `(waveform, sampling_rate)` or waveform) to clone; adds the
                voice system turn and the assistant thinks first.
            natural_instruction: `text` is a free-form request that describes the voice and holds the words to say
                (e.g. "用气喘吁吁的年轻男性声音说：我跑不动了"); `instruction` and `style` are not used.
        """
        if natural_instruction and (instruction is not None or style is not None):
            raise ValueError(
                "`natural_instruction=True` takes the whole request in `text`; do not pass `instruction` or `style`."
            )
        voice_item = None if voice is None else as_audio_item(voice, "voice")
        texts = text if is_batch(text) else [text]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("`text` must be a non-empty string or a list of them.")
        settings = {"instruction": instruction, "style": style, "voice": voice_item, "natural": natural_instruction}
        return self._task_inputs("tts", [{"text": t, **settings} for t in texts])

    def audio_understanding(self, audio, question: str, thinking: bool = False) -> BatchFeature:
        """Answer a question about the audio in text (instruct model), optionally reasoning first."""
        samples = [{"audio": item, "question": question, "thinking": thinking} for item in as_audio_items(audio)]
        return self._task_inputs("audio_understanding", samples)

    def spoken_dialogue(
        self, conversation, system_prompt: str | None = None, voice=None, output_modality: str = "audio"
    ) -> BatchFeature:
        """
        Spoken dialogue (instruct model). User turns are audio; earlier assistant turns are text (speech-to-text
        dialogue) or text + audio (spoken dialogue, laid out as the speech stream).

        Args:
            conversation: the messages so far, ending with a user turn (or a list of conversations for a batch).
            system_prompt: put at the start of the first user turn followed by a blank line, as the original does.
            voice: a voice prompt for the answer, given as a system turn "Your voice should be:" + audio.
            output_modality: `"audio"` (spoken answer, opens with `<|sostm|>`) or `"text"` (speech-to-text dialogue,
                opens with an empty thinking block).
        """
        conversations = conversation if is_conversation_batch(conversation) else [conversation]
        voice_item = None if voice is None else as_audio_item(voice, "voice")
        samples = [
            {"conversation": check_conversation(conv, index), "system_prompt": system_prompt, "voice": voice_item}
            for index, conv in enumerate(conversations)
        ]
        tasks = {"audio": "spoken_dialogue", "text": "speech_to_text_dialogue"}
        if output_modality not in tasks:
            raise ValueError(f"`output_modality` must be 'text' or 'audio', got {output_modality!r}.")
        return self._task_inputs(tasks[output_modality], samples)

    def text_dialogue(self, conversation, thinking: bool = False) -> BatchFeature:
        """Text chat (instruct model): messages, or a string as one user turn; a list of those for a batch."""
        batched = is_batch(conversation) and len(conversation) > 0 and not isinstance(conversation[0], dict)
        conversations = conversation if batched else [conversation]
        conversations = [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in conversations]
        return self._task_inputs("text_dialogue", [{"conversation": c, "thinking": thinking} for c in conversations])

    def in_context_learning(self, audio, examples: list[dict], instruction: str) -> BatchFeature:
        """
        Few-shot speech-to-speech (base model): an instruction, examples of input speech -> output speech, then the
        input to transform. The model answers with a speech stream (its prompt ends with `<|sostm|>`).

        Args:
            audio: the input speech (a list for a batch sharing the examples).
            examples: dicts with `input_audio`, `output_audio` and `output_text` (the transcript of `output_audio`).
            instruction: e.g. "Convert the timbre of the input speech to target timbre."
        """
        if not isinstance(instruction, str):
            raise ValueError(f"`instruction` must be a string, got {type(instruction).__name__}.")
        checked = []
        for index, example in enumerate(examples):
            if not isinstance(example, dict) or set(example) != {"input_audio", "output_audio", "output_text"}:
                raise ValueError(
                    f"Example {index} must be a dict with exactly `input_audio`, `output_audio` and `output_text`."
                )
            if not isinstance(example["output_text"], str) or not example["output_text"].strip():
                raise ValueError(f"Example {index}: `output_text` must be the non-empty transcript of `output_audio`.")
            checked.append(
                {
                    "input_audio": as_audio_item(example["input_audio"], f"examples[{index}]['input_audio']"),
                    "output_audio": as_audio_item(example["output_audio"], f"examples[{index}]['output_audio']"),
                    "output_text": example["output_text"],
                }
            )
        samples = [{"audio": item, "examples": checked, "instruction": instruction} for item in as_audio_items(audio)]
        return self._task_inputs("in_context_learning", samples)

    def speech_continuation(self, audio) -> BatchFeature:
        """Continue the given speech (base model): `<|sosp|>` and the prompt's patches, left open."""
        return self._task_inputs("speech_continuation", [{"audio": item} for item in as_audio_items(audio)])

    def generation_kwargs(self, task: str) -> dict:
        """
        The original's way of generating a task helper's answer, as `generate` keyword arguments: `eos_token_id` (end
        of text plus the task's stop tokens) and the text and audio sampling of the task's entry in
        `prompting_mimo_audio.TASKS`. `task` is a helper's name, or `"speech_to_text_dialogue"` for
        `spoken_dialogue(..., output_modality="text")`.

        Example: `model.generate(**processor.asr(audio), **processor.generation_kwargs("asr"), max_new_tokens=256)`.
        """
        entry = get_task(task)
        stop_ids = [self.tokenizer.eos_token_id] + [getattr(self, f"{name}_id") for name in entry.stop_tokens]
        stop_ids = list(dict.fromkeys(token for token in stop_ids if token is not None))
        return {"eos_token_id": stop_ids, **entry.text_sampling, **entry.audio_sampling}

    def _task_inputs(self, task: str, samples: list[dict]) -> BatchFeature:
        """Model inputs of a batch of `task` prompts: `samples` holds each sample's inputs to the task's builder."""
        entry = get_task(task)
        return self._build_inputs([entry.prompt_pieces(index, **sample) for index, sample in enumerate(samples)])

    # ------------------------------------------------------------------------------------------------ audio -> codes

    def encode_audio(self, audio) -> list[torch.Tensor]:
        """
        Audio -> the patches the model reads, one clip at a time (a single input or a list). A MiMo-V2.5-ASR
        processor encodes waveforms with that release's 30 s chunk recipe (see `_waveforms_to_codes`).

        Returns:
            a list of int64 tensors `(num_patches, group_size, audio_channels)`, one per clip.
        """
        return self._audio_items_to_patches(as_audio_items(audio))

    def _audio_items_to_patches(self, items: list[dict]) -> list[torch.Tensor]:
        frames: list[torch.Tensor | None] = [None] * len(items)
        waveforms = {}
        for index, item in enumerate(items):
            if item.get("audio_codes") is not None:
                frames[index] = self._check_codes(item["audio_codes"], index)
            else:
                waveforms[index] = self._load_waveform(item, index)
        if waveforms:
            codes = self._waveforms_to_codes(list(waveforms.values()))
            for index, clip_codes in zip(waveforms, codes):
                frames[index] = clip_codes
        return [self._group_frames(clip_frames) for clip_frames in frames]

    def _check_codes(self, codes, index: int) -> torch.Tensor:
        """Precomputed codes `(num_quantizers, frames)` -> frames `(frames, audio_channels)`."""
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"Audio {index}: `audio_codes` must hold integers, got {codes.dtype}.")
        max_quantizers = (
            self.audio_tokenizer.config.num_quantizers if self.audio_tokenizer is not None else MAX_CODEC_QUANTIZERS
        )
        if codes.ndim == 2 and codes.shape[0] > max_quantizers and self.audio_channels <= codes.shape[1]:
            raise ValueError(
                f"Audio {index}: `audio_codes` has shape {tuple(codes.shape)}, which looks like (frames, "
                f"num_quantizers): the codec has at most {max_quantizers} quantizers. Pass (num_quantizers, frames), "
                "e.g. `audio_codes.T`."
            )
        if codes.ndim != 2 or codes.shape[0] < self.audio_channels or codes.shape[1] == 0:
            raise ValueError(
                f"Audio {index}: `audio_codes` must have shape (num_quantizers >= {self.audio_channels}, frames >= 1), "
                f"got {tuple(codes.shape)}."
            )
        codes = codes[: self.audio_channels].T.to(torch.int64)
        limits = torch.tensor(self.audio_empty_ids)
        if (codes < 0).any() or (codes >= limits).any():
            raise ValueError(
                f"Audio {index}: `audio_codes` must lie in [0, codebook size) per channel, i.e. below "
                f"{self.audio_empty_ids}."
            )
        return codes

    def _load_waveform(self, item: dict, index: int) -> tuple[torch.Tensor, int]:
        """Return a mono float32 waveform `(samples,)` and its sampling rate."""
        if item.get("audio") is not None:
            waveform = item["audio"]
            sampling_rate = item.get("sampling_rate", self.sampling_rate)
            waveform = torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)
            if not waveform.is_floating_point():
                raise ValueError(f"Audio {index}: the waveform must be float in [-1, 1], got {waveform.dtype}.")
            if waveform.ndim == 2 and waveform.shape[0] > waveform.shape[1]:
                raise ValueError(
                    f"Audio {index}: the waveform has shape {tuple(waveform.shape)}, which looks like (samples, "
                    "channels); pass stereo or multichannel audio as (channels, samples), e.g. `waveform.T` (it is "
                    "downmixed to mono), or a mono waveform (samples,)."
                )
            if waveform.ndim == 2:
                waveform = waveform.float().mean(dim=0)  # (channels, samples) -> mono
            elif waveform.ndim != 1:
                raise ValueError(
                    f"Audio {index}: expected a waveform (samples,) or (channels, samples), got {tuple(waveform.shape)}."
                )
        else:
            try:
                waveform, sampling_rate = read_audio(path=item.get("path"), url=item.get("url"))
            except ValueError as error:
                raise ValueError(f"Audio {index}: {error}") from error
            waveform = waveform.mean(dim=0)  # (channels, samples) -> mono, as the original
        if waveform.numel() == 0:
            raise ValueError(f"Audio {index}: the audio is empty (0 samples).")
        return waveform.float(), int(sampling_rate)

    def _waveforms_to_codes(self, waveforms: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """
        Log-mel features and the codec, one batch for all clips; returns frames `(frames, audio_channels)`.

        MiMo-Audio computes one log-mel over each whole clip. MiMo-V2.5-ASR cuts each clip (at 24 kHz) into 30 s
        chunks and encodes every chunk on its own, with its own log-mel: a last piece shorter than `n_fft` samples is
        merged into the chunk before it, and a chunk shorter than `n_fft` (a clip that short) is zero-padded to
        `n_fft` samples. A clip's codes are its chunks' codes in order. The chunks of all clips go through the codec
        in one batch (the codec gives each item of a padded batch the codes it gives it alone).
        """
        if self.audio_tokenizer is None:
            raise ValueError(
                "Audio given as a waveform or a file needs the processor's `audio_tokenizer` (the codec); load the "
                "processor with one or pass precomputed `audio_codes`."
            )
        if self.model_variant != "mimo-v2.5-asr":
            return self._encode_clips(waveforms)
        chunks, owners = [], []
        for clip, (waveform, sampling_rate) in enumerate(waveforms):
            for chunk in self._v25_chunks(resample_waveform(waveform, sampling_rate, self.sampling_rate)):
                chunks.append((chunk, self.sampling_rate))
                owners.append(clip)
        parts = [[] for _ in waveforms]
        for clip, codes in zip(owners, self._encode_clips(chunks)):
            parts[clip].append(codes)
        return [torch.cat(clip_parts) for clip_parts in parts]

    def _v25_chunks(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        """MiMo-V2.5-ASR's 30 s chunks `(samples,)` of one clip at the processor's rate (see `_waveforms_to_codes`)."""
        chunk_samples = V25_CHUNK_SECONDS * self.sampling_rate
        n_fft = self.feature_extractor.n_fft
        total, start, chunks = waveform.shape[-1], 0, []
        while start < total:
            end = min(start + chunk_samples, total)
            if 0 < total - end < n_fft:
                end = total
            chunk = waveform[start:end]
            if chunk.shape[-1] < n_fft:
                chunk = torch.nn.functional.pad(chunk, (0, n_fft - chunk.shape[-1]))
            chunks.append(chunk)
            start = end
        return chunks

    def _encode_clips(self, waveforms: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """Each clip's log-mel, then the codec on all of them in one padded batch; frames `(frames, channels)`."""
        features = [self.feature_extractor(wave, sampling_rate=rate)["input_features"][0] for wave, rate in waveforms]
        codes = self.audio_tokenizer.encode_clips(features, num_quantizers=self.audio_channels)
        return [clip_codes.T.long() for clip_codes in codes]

    def _group_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames `(frames, C)` -> patches `(num_patches, group_size, C)`, repeating the last frame as padding."""
        remainder = frames.shape[0] % self.group_size
        if remainder:
            frames = torch.cat([frames, frames[-1:].expand(self.group_size - remainder, -1)])
        return frames.reshape(-1, self.group_size, self.audio_channels)

    # ----------------------------------------------------------------------------------------------- layout -> ids

    def _build_inputs(self, batch: list[list], max_length: int | None = None) -> BatchFeature:
        """Turn the pieces of each sample into positions, encode all audio at once, pad on the left (to the longest
        sample, or to `max_length`)."""
        audio_items = [piece.audio for pieces in batch for piece in pieces if not isinstance(piece, TextPiece)]
        patches = iter(self._audio_items_to_patches(audio_items))
        rows = [self._pieces_to_row(pieces, patches) for pieces in batch]

        length = max(row[0].shape[0] for row in rows)
        if max_length is not None:
            if length > max_length:
                raise ValueError(
                    f"A prompt has {length} positions, more than `max_length` ({max_length}); prompts are not "
                    "truncated (that would cut audio patches)."
                )
            length = max_length
        empty_patch = torch.tensor(self.audio_empty_ids).expand(self.group_size, -1)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        audio_input_ids = empty_patch.repeat(len(rows), length, 1, 1)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for index, (text, audio) in enumerate(rows):
            input_ids[index, length - text.shape[0] :] = text
            audio_input_ids[index, length - text.shape[0] :] = audio
            attention_mask[index, length - text.shape[0] :] = 1
        return BatchFeature(
            {"input_ids": input_ids, "audio_input_ids": audio_input_ids, "attention_mask": attention_mask}
        )

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pieces_to_row(self, pieces: list, patches: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: text ids `(seq_len,)` and patches `(seq_len, group_size, audio_channels)`."""
        segments = expand_pieces(pieces, self._tokenize, patches, self)
        empty_patch = torch.tensor(self.audio_empty_ids).expand(self.group_size, -1)
        text = torch.tensor([token for token_ids, _ in segments for token in token_ids], dtype=torch.long)
        audio = torch.cat(
            [clip if clip is not None else empty_patch.expand(len(ids), -1, -1) for ids, clip in segments]
        )
        return text, audio

    # ---------------------------------------------------------------------------------------------- outputs -> text

    def batch_decode(self, token_ids, *args, **kwargs) -> list[str]:
        """
        The text of token ids `(batch, length)`, as every processor's `batch_decode` (the tokenizer's). For the text
        and the speech of a `generate` output, use [`~MiMoAudioProcessor.batch_decode_generation`].
        """
        if hasattr(token_ids, "sequences") or {"audio_sequences", "prompt_length", "decode_audio"} & set(kwargs):
            raise TypeError(
                "`batch_decode` decodes token ids to text, as every processor's does; the text and speech of a "
                "generate output come from `batch_decode_generation(output, prompt_length=...)`."
            )
        return self.tokenizer.batch_decode(token_ids, *args, **kwargs)

    def decode(self, token_ids, *args, **kwargs) -> str:
        """The text of one sequence of token ids (the tokenizer's `decode`); see `decode_generation` for a
        `generate` output with speech."""
        if hasattr(token_ids, "sequences") or {"audio_sequences", "prompt_length", "decode_audio"} & set(kwargs):
            raise TypeError(
                "`decode` decodes token ids to text, as every processor's does; the text and speech of a generate "
                "output come from `decode_generation(output, prompt_length=...)`."
            )
        return self.tokenizer.decode(token_ids, *args, **kwargs)

    def post_process_multimodal_output(
        self, generated_outputs, skip_special_tokens: bool = True, generation_mode: str | None = None, **kwargs
    ):
        """
        What Transformers' `any-to-any` pipeline returns for a `generate` output (or a tensor of token ids): the text
        of each sequence (`generation_mode` `None` / `"text"`, decoded by the tokenizer), or the generated speech of
        each sample (`"audio"`, a float32 numpy waveform at `sampling_rate`, `None` where it did not speak; needs the
        dict output of `generate` and a prompt built with `output_modality="audio"`).
        """
        if generation_mode == "audio":
            if not hasattr(generated_outputs, "audio_sequences"):
                raise ValueError(
                    "generation_mode='audio' needs `generate`'s dict output (`return_dict_in_generate=True`)."
                )
            decoded = self.batch_decode_generation(generated_outputs)
            return [None if audio is None else audio.numpy() for audio in decoded.audio]
        if generation_mode not in (None, "text"):
            raise ValueError(f"MiMo-Audio generates text or audio, not generation_mode={generation_mode!r}.")
        sequences = getattr(generated_outputs, "sequences", generated_outputs)
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode_generation(
        self,
        sequences,
        audio_sequences: torch.Tensor | None = None,
        prompt_length: int = 0,
        skip_special_tokens: bool = False,
        decode_audio: bool = True,
    ) -> MiMoAudioDecodedOutput:
        """
        Text and speech of generated sequences.

        Args:
            sequences: `generate`'s output (an object with `sequences` and `audio_sequences`) or the text channel
                `(batch, total_len)`.
            audio_sequences (`(batch, total_len, group_size, audio_channels)`, *optional*): the patches, when
                `sequences` is a tensor.
            prompt_length (`int`): positions to skip at the start (the prompt, `inputs["input_ids"].shape[1]`).
            skip_special_tokens (`bool`): drop every special token from the text. By default the text is cleaned as
                the original does: `<|empty|>`, `<|eot|>` and `<|eostm|>` are removed, other tokens are kept. For a
                MiMo-V2.5-ASR processor the cleanup is that release's ASR transcript: stripped first, then those
                tokens removed, then the language tags `<chinese>` / `<english>` (and the text stripped again) when
                one is present.
            decode_audio (`bool`): run the codec on the generated speech.

        The text of a sample ends before its first end-of-text / padding / `<|im_end|>` token (the stop token, which
        the original drops with the last generated position). Its speech is, as in the original, the patches after
        the first `<|sostm|>` (or from the start) and before the first `<|eostm|>` (or to the end), frames whose first
        code is the empty id dropped (text and padding positions hold empty ids), decoded in segments of 1500 frames.
        Unlike the original, the last generated position is kept.
        """
        if hasattr(sequences, "sequences"):
            if audio_sequences is not None:
                raise ValueError("Pass either a generate output or tensors, not both.")
            audio_sequences = getattr(sequences, "audio_sequences", None)
            sequences = sequences.sequences
        sequences = torch.as_tensor(sequences)
        if sequences.ndim != 2:
            raise ValueError(f"`sequences` must be (batch, length), got shape {tuple(sequences.shape)}.")
        expected = (*sequences.shape, self.group_size, self.audio_channels)
        if audio_sequences is not None and tuple(audio_sequences.shape) != expected:
            raise ValueError(f"`audio_sequences` must have shape {expected}, got {tuple(audio_sequences.shape)}.")
        if not 0 <= prompt_length <= sequences.shape[1]:
            raise ValueError(f"`prompt_length` ({prompt_length}) must be within [0, {sequences.shape[1]}].")

        texts, speech = [], []
        for index in range(sequences.shape[0]):
            text_ids = sequences[index, prompt_length:].cpu()
            end = self._text_end(text_ids)
            texts.append(self._clean_text(text_ids[:end], skip_special_tokens))
            if audio_sequences is not None and decode_audio:
                speech.append(self._speech_frames(text_ids, audio_sequences[index, prompt_length:].cpu()))
        audios = [None] * len(texts)
        clips = [index for index, frames in enumerate(speech) if frames.shape[0]]
        for index, waveform in zip(clips, self.decode_codes([speech[index].T for index in clips])):
            audios[index] = waveform
        return MiMoAudioDecodedOutput(text=texts, audio=audios, sampling_rate=self.sampling_rate)

    def decode_generation(self, sequences, audio_sequences=None, prompt_length: int = 0, **kwargs):
        """`batch_decode_generation` for one sample (`(length,)` or `(1, length)`); returns `(text, waveform or
        None)`."""
        if hasattr(sequences, "sequences"):
            audio_sequences = getattr(sequences, "audio_sequences", None)
            sequences = sequences.sequences
        sequences = torch.as_tensor(sequences)
        if sequences.ndim == 1:
            sequences = sequences[None]
            audio_sequences = None if audio_sequences is None else audio_sequences[None]
        if sequences.shape[0] != 1:
            raise ValueError(
                f"`decode_generation` takes one sample, got a batch of {sequences.shape[0]}; use "
                "`batch_decode_generation`."
            )
        output = self.batch_decode_generation(sequences, audio_sequences, prompt_length=prompt_length, **kwargs)
        return output.text[0], output.audio[0]

    @property
    def _answer_end_ids(self) -> list[int]:
        """The ids an answer's text ends at: end-of-text, padding and the layout's `ANSWER_END_TOKENS`."""
        ends = [getattr(self, f"{name}_id") for name in ANSWER_END_TOKENS]
        return [self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, *ends]

    def _text_end(self, text_ids: torch.Tensor) -> int:
        return answer_text_end(text_ids, self._answer_end_ids)

    def _clean_text(self, text_ids: torch.Tensor, skip_special_tokens: bool) -> str:
        text = self.tokenizer.decode(text_ids.tolist(), skip_special_tokens=skip_special_tokens)
        return clean_answer_text(text, self.model_variant)

    def _speech_frames(self, text_ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The generated speech frames `(frames, audio_channels)` of one sample."""
        start, end = speech_stream_span(text_ids, self.sostm_token_id, self.eostm_token_id)
        frames = (
            patches[start:end].reshape(-1, self.audio_channels)
            if end > start
            else patches[:0].reshape(0, self.audio_channels)
        )
        frames = frames[frames[:, 0] != self.audio_empty_ids[0]]
        if (frames < 0).any() or (frames >= torch.tensor(self.audio_empty_ids)).any():
            raise ValueError("The generated speech holds codes outside the codebooks (or empty ids inside a patch).")
        return frames.long()

    # ----------------------------------------------------------------------------------------------- codes -> audio

    def decode_codes(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """
        Codes of several clips, each `(audio_channels, frames)`, -> their waveforms `(samples,)` (float32, CPU).

        As in the original, every clip is decoded in segments of 1500 frames whose audio is concatenated; all segments
        go through the codec in one padded batch (each is decoded as if it were alone), see
        `MiMoAudioTokenizerModel.decode_clips`.
        """
        if not codes:
            return []
        if self.audio_tokenizer is None:
            raise ValueError("Decoding speech needs the processor's `audio_tokenizer` (the codec).")
        return self.audio_tokenizer.decode_clips(codes)

    def stream_audio(
        self,
        steps: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
        chunk_frames: int = 25,
        left_overlap: int | None = None,
        right_overlap: int | None = None,
    ) -> Iterator[list[torch.Tensor]]:
        """
        Turn streamed generation steps into waveform chunks with the codec's streaming decode.

        Args:
            steps: `(text_ids (batch,), audio_ids (batch, group_size, audio_channels))` per generated position, e.g.
                a `MiMoAudioStreamer` (with `skip_prompt=True`) that `generate` fills from another thread.
            chunk_frames (`int`, defaults to 25): speech frames (25 per second) a sample collects before they are
                decoded.
            left_overlap, right_overlap (`int`, *optional*): the codec's streaming context in frames (defaults from its
                config, 250 / 40 for the released codec).

        Yields:
            whenever some sample has new audio, a list with one float32 CPU waveform `(samples,)` per sample (empty
            for samples without new audio). A sample's speech is every patch it generates before its first
            `<|eostm|>`, end-of-text, padding or `<|im_end|>` token; the concatenation of its chunks is its whole
            speech, decoded as the codec's `streaming_decode` does.
        """
        if self.audio_tokenizer is None:
            raise ValueError("Streaming speech needs the processor's `audio_tokenizer` (the codec).")
        if chunk_frames < 1:
            raise ValueError(f"`chunk_frames` must be positive, got {chunk_frames}.")
        codec = self.audio_tokenizer
        stops = {self.eostm_token_id, *self._answer_end_ids}
        pending, caches, finished = [], [], []

        def decode(index: int, last: bool) -> torch.Tensor:
            codes = (
                torch.cat(pending[index]) if pending[index] else torch.zeros(0, self.audio_channels, dtype=torch.long)
            )
            output = codec.streaming_decode(
                codes.T[None].to(codec.device),
                cache=caches[index],
                is_last_chunk=last,
                left_overlap=left_overlap,
                right_overlap=right_overlap,
            )
            pending[index], caches[index] = [], output.cache
            return output.audio_values[0, 0, : int(output.audio_values_lengths[0])].float().cpu()

        def has_audio(index: int) -> bool:
            return bool(pending[index]) or caches[index] is not None

        empty_first = self.audio_empty_ids[0]
        for text_ids, audio_ids in steps:
            text_ids = torch.as_tensor(text_ids).reshape(-1).cpu()
            if not pending:
                pending, caches, finished = [[] for _ in text_ids], [None] * len(text_ids), [False] * len(text_ids)
            chunk = [torch.zeros(0) for _ in text_ids]
            for index, token in enumerate(text_ids.tolist()):
                if finished[index]:
                    continue
                if token in stops:
                    finished[index] = True
                    if has_audio(index):
                        chunk[index] = decode(index, last=True)
                elif token == self.empty_token_id and audio_ids is not None:
                    frames = torch.as_tensor(audio_ids)[index].reshape(-1, self.audio_channels).cpu().long()
                    pending[index].append(frames[frames[:, 0] != empty_first])
                    if sum(part.shape[0] for part in pending[index]) >= chunk_frames:
                        chunk[index] = decode(index, last=False)
            if any(piece.numel() for piece in chunk):
                yield chunk
        final = [
            decode(index, last=True) if not finished[index] and has_audio(index) else torch.zeros(0)
            for index in range(len(pending))
        ]
        if any(piece.numel() for piece in final):
            yield final

    def save_audio(self, audio, path, sampling_rate: int | None = None):
        """Write one waveform (or a list of waveforms) to `path` (or a list of paths) with soundfile."""
        audios = audio if isinstance(audio, (list, tuple)) else [audio]
        paths = path if isinstance(path, (list, tuple)) else [path]
        if len(audios) != len(paths):
            raise ValueError(f"Got {len(audios)} waveforms but {len(paths)} paths.")
        for waveform, target in zip(audios, paths):
            if waveform is None:
                raise ValueError(f"No audio to save to {target!r} (the sample generated no speech).")
            waveform = torch.as_tensor(waveform).detach().float().cpu().reshape(-1)
            sf.write(os.fspath(target), waveform.numpy(), sampling_rate or self.sampling_rate)
