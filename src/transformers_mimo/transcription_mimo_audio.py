"""Long-form speech recognition: recordings of any length, cut at pauses, transcribed in batches, with timestamps.

    from transformers_mimo import MiMoAudioForConditionalGeneration, MiMoAudioProcessor, transcribe

    model = MiMoAudioForConditionalGeneration.from_pretrained("mimo-v2.5-asr-hf").eval()
    processor = MiMoAudioProcessor.from_pretrained("mimo-v2.5-asr-hf")
    result = transcribe(model, processor, "meeting.wav", language="en", batch_size=8)
    result.text                      # the whole transcript
    result.segments[0].start, .end   # seconds in the recording, .text the segment's transcript

A recording no longer than `max_segment_seconds` (default 30 s, what MiMo-V2.5-ASR encodes as one chunk) is
transcribed whole, as `processor.asr` reads it, unless it holds no speech at all. A longer one is cut into segments of
at most that length:

1. Voice activity: which 10 ms frames hold speech. By default Silero VAD (MIT, its model ships inside the
   `silero-vad` wheel and runs on CPU without network: `pip install transformers-mimo[asr]`); without it, or with
   `vad="energy"`, frames louder than a threshold relative to the recording's loudest frames.
2. Speech regions closer than `min_pause_seconds` are merged and blips under 0.1 s dropped. Silence between regions
   is left out (a segment keeps up to 0.2 s of the pause on each side), so a recording of silence only gives no
   segment and an empty transcript.
3. Regions are packed into segments up to the limit, so a segment ends in a pause. A region longer
   than the limit (speech without a pause) is cut at the quietest 10 ms frame of the last quarter before the limit,
   where a breath or a word boundary most likely is.

Segments are transcribed `batch_size` at a time (sorted by length so that a batch pads little), with the processor's
ASR prompt and the original's ASR generation settings (`processor.generation_kwargs("asr")`). Memory holds the
recording's waveform (96 kB per second at 24 kHz) plus one batch of segments through the codec and the model, so it
grows with `batch_size` and `max_segment_seconds`, not with the length of the recording.
"""

import functools
import math
import numbers
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch

from .audio_utils import resample_waveform


__all__ = ["Transcription", "TranscriptionSegment", "find_speech_segments", "transcribe"]

# Voice activity is decided per frame of this length.
FRAME_SECONDS = 0.01
# Silero VAD reads 16 kHz audio.
SILERO_SAMPLING_RATE = 16000
VAD_METHODS = ("auto", "silero", "energy")
# Silero VAD runs on blocks of this many seconds.
VAD_BLOCK_SECONDS = 600
# Speech shorter than this (clicks, blips) is not transcribed.
MIN_SPEECH_SECONDS = 0.1
# Each segment keeps up to this much of the pause before and after its speech.
SEGMENT_MARGIN_SECONDS = 0.2


@dataclass
class TranscriptionSegment:
    """One transcribed piece of a recording: `start` / `end` in seconds from the recording's start."""

    start: float
    end: float
    text: str


@dataclass
class Transcription:
    """
    The transcript of one recording.

    Args:
        text (`str`): the segments' texts joined (with a space, except next to Chinese characters).
        segments (`list[TranscriptionSegment]`): the segments in time order.
        duration (`float`): length of the recording in seconds.
    """

    text: str
    segments: list[TranscriptionSegment] = field(default_factory=list)
    duration: float = 0.0


# ------------------------------------------------------------------------------------------------ voice activity


def _frame_energy(waveform: torch.Tensor, frame: int) -> torch.Tensor:
    """Mean square of each `frame`-sample frame `(frames,)`, the last (partial) frame included. Computed a block at a
    time, so no full-length temporary is made."""
    frames = math.ceil(waveform.shape[-1] / frame)
    energy = torch.empty(frames)
    block = 10_000  # frames
    for start in range(0, frames, block):
        piece = waveform[start * frame : (start + block) * frame].float()
        whole = piece.shape[-1] // frame
        energy[start : start + whole] = piece[: whole * frame].reshape(whole, frame).square().mean(-1)
        if piece.shape[-1] > whole * frame:
            energy[start + whole] = piece[whole * frame :].square().mean()
    return energy


def _energy_activity(energy: torch.Tensor, threshold_db: float) -> torch.Tensor:
    """Frames at most `threshold_db` below the recording's loud frames (its 95th percentile) and above -60 dBFS."""
    level = 10 * torch.log10(energy + 1e-12)
    loud = torch.quantile(level[:: max(1, level.numel() // 100_000)].float(), 0.95).item()
    return (level > max(loud - threshold_db, -60.0)) & (energy > 0)


@functools.cache
def _silero_model():
    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # its TorchScript loading warns about `torch.jit` deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()


def _silero_activity(waveform: torch.Tensor, sampling_rate: int, frame: int, frames: int) -> torch.Tensor:
    """Silero VAD's speech frames, run on blocks of `VAD_BLOCK_SECONDS` (so only a block is resampled at a time)."""
    from silero_vad import get_speech_timestamps

    activity = torch.zeros(frames, dtype=torch.bool)
    block = VAD_BLOCK_SECONDS * sampling_rate // frame * frame  # whole frames
    scale = sampling_rate / (SILERO_SAMPLING_RATE * frame)  # 16 kHz sample -> frame
    for offset in range(0, waveform.shape[-1], block):
        audio = resample_waveform(waveform[offset : offset + block], sampling_rate, SILERO_SAMPLING_RATE)
        regions = get_speech_timestamps(
            audio, _silero_model(), sampling_rate=SILERO_SAMPLING_RATE, min_silence_duration_ms=100, speech_pad_ms=30
        )
        first = offset // frame
        for region in regions:
            activity[first + int(region["start"] * scale) : first + math.ceil(region["end"] * scale)] = True
    return activity


def _resolve_vad(vad: str) -> str:
    if vad not in VAD_METHODS:
        raise ValueError(f"`vad` must be one of {list(VAD_METHODS)}, got {vad!r}.")
    if vad == "energy":
        return vad
    try:
        import silero_vad  # noqa: F401
    except ImportError:
        if vad == "silero":
            raise ValueError("`vad='silero'` needs the silero-vad package: pip install 'transformers-mimo[asr]'.")
        return "energy"
    return "silero"


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """`[start, end)` of every run of True in a 1-d boolean mask."""
    edges = torch.diff(torch.nn.functional.pad(mask.int(), (1, 1))).nonzero()[:, 0].tolist()
    return list(zip(edges[::2], edges[1::2]))


def find_speech_segments(
    waveform: torch.Tensor,
    sampling_rate: int,
    max_segment_seconds: float = 30.0,
    min_pause_seconds: float = 0.3,
    vad: str = "auto",
    energy_threshold_db: float = 35.0,
) -> list[tuple[float, float]]:
    """
    Where to cut a recording for transcription (see the module docstring for the rules).

    Args:
        waveform (`torch.Tensor` of shape `(samples,)`): mono audio.
        sampling_rate (`int`): its rate in Hz.
        max_segment_seconds (`float`): longest segment (at least 1 s).
        min_pause_seconds (`float`): shorter pauses do not separate speech regions.
        vad (`str`): `"silero"`, `"energy"` or `"auto"` (Silero VAD when installed, else energy).
        energy_threshold_db (`float`): for `"energy"`: speech frames are at most this far below the loud frames.

    Returns:
        `[(start, end), ...]` in seconds, in order, each at most `max_segment_seconds` long; empty when the
        recording holds no speech.
    """
    if max_segment_seconds < 1:
        raise ValueError(f"`max_segment_seconds` must be at least 1, got {max_segment_seconds}.")
    if min_pause_seconds < 0:
        raise ValueError(f"`min_pause_seconds` must be non-negative, got {min_pause_seconds}.")
    method = _resolve_vad(vad)
    frame = max(1, round(sampling_rate * FRAME_SECONDS))
    frame_seconds = frame / sampling_rate  # exactly, so that timestamps do not drift over long recordings
    energy = _frame_energy(waveform, frame)
    if method == "silero":
        activity = _silero_activity(waveform, sampling_rate, frame, energy.shape[0])
    else:
        activity = _energy_activity(energy, energy_threshold_db)

    # Speech regions in frames: pauses shorter than `min_pause_seconds` bridged, blips shorter than 0.1 s dropped.
    regions = []
    for start, end in _runs(activity):
        if regions and start - regions[-1][1] < min_pause_seconds / frame_seconds:
            regions[-1] = (regions[-1][0], end)
        else:
            regions.append((start, end))
    regions = [(start, end) for start, end in regions if end - start >= MIN_SPEECH_SECONDS / frame_seconds]

    # Pack the regions into segments of speech, leaving room for the margins added below.
    pad = round(SEGMENT_MARGIN_SECONDS / frame_seconds)
    limit = int(max_segment_seconds / frame_seconds) - 2 * pad
    segments: list[list[int]] = []
    for start, end in regions:
        if segments and end - segments[-1][0] <= limit:
            segments[-1][1] = end  # the region fits into the open segment, with the pause before it
            continue
        while end - start > limit:  # no pause within the limit: cut at the quietest frame of its last quarter
            window_start = start + (3 * limit) // 4
            cut = window_start + int(torch.argmin(energy[window_start : start + limit]))
            segments.append([start, cut])
            start = cut
        segments.append([start, end])

    # Margins: up to SEGMENT_MARGIN_SECONDS of the surrounding pause on each side, never past a neighbour's share.
    frames = energy.shape[0]
    bounds = []
    for index, (start, end) in enumerate(segments):
        left = 0 if index == 0 else (segments[index - 1][1] + start + 1) // 2
        right = frames if index == len(segments) - 1 else (end + segments[index + 1][0]) // 2
        bounds.append((max(start - pad, left), min(end + pad, right)))
    duration = waveform.shape[-1] / sampling_rate
    return [(round(start * frame_seconds, 3), round(min(end * frame_seconds, duration), 3)) for start, end in bounds]


# ------------------------------------------------------------------------------------------------------ transcribe


def _load_recording(audio, index: int) -> tuple[torch.Tensor, int]:
    """A path, `(waveform, sampling_rate)` or a 24 kHz waveform -> mono float32 `(samples,)` and its rate."""
    if isinstance(audio, (str, os.PathLike)):
        path = os.fspath(audio)
        if not os.path.isfile(path):
            raise ValueError(f"`audio` {index}: no audio file at {path!r}.")
        try:
            array, sampling_rate = sf.read(path, dtype="float32")
        except Exception as error:  # soundfile raises several error types for unreadable data
            raise ValueError(f"`audio` {index}: cannot decode {path!r} as audio ({error}).") from error
        waveform = torch.from_numpy(array if array.ndim == 1 else array.mean(axis=1, dtype=np.float32))
    else:
        waveform, sampling_rate = audio if isinstance(audio, tuple) else (audio, 24000)
        waveform = torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)
        if not waveform.is_floating_point() or waveform.ndim not in (1, 2):
            raise ValueError(
                f"`audio` {index}: expected a float waveform (samples,) or (channels, samples), got "
                f"{waveform.dtype} {tuple(waveform.shape)}."
            )
        if waveform.numel() == 0:
            raise ValueError(f"`audio` {index}: the audio is empty (0 samples).")
        waveform = waveform.float() if waveform.ndim == 1 else waveform.float().mean(dim=0)  # mono: no copy
    if not isinstance(sampling_rate, numbers.Integral) or isinstance(sampling_rate, bool) or sampling_rate < 1:
        raise ValueError(f"`audio` {index}: the sampling rate must be a positive int, got {sampling_rate!r}.")
    sampling_rate = int(sampling_rate)
    if waveform.numel() == 0:
        raise ValueError(f"`audio` {index}: the audio is empty (0 samples).")
    block = 1 << 20  # checked a block at a time: no full-length temporary
    if not all(torch.isfinite(waveform[start : start + block]).all() for start in range(0, waveform.numel(), block)):
        raise ValueError(f"`audio` {index}: the audio holds NaN or infinite samples.")
    return waveform, sampling_rate


_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


def join_segment_texts(texts: list[str]) -> str:
    """Join transcripts with a space, without one where either side is a Chinese character or punctuation."""
    joined = ""
    for text in (text.strip() for text in texts):
        if not text:
            continue
        if joined and not (_CJK.match(joined[-1]) or _CJK.match(text[0])):
            joined += " "
        joined += text
    return joined


def transcribe(
    model,
    processor,
    audio,
    language: str | None = None,
    instruction: str | None = None,
    batch_size: int = 8,
    max_segment_seconds: float = 30.0,
    min_pause_seconds: float = 0.3,
    vad: str = "auto",
    max_new_tokens: int = 256,
    generation_kwargs: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Transcription | list[Transcription]:
    """
    Transcribe recordings of any length (see the module docstring).

    Args:
        model ([`MiMoAudioForConditionalGeneration`]): MiMo-V2.5-ASR or MiMo-Audio-7B-Instruct.
        processor ([`MiMoAudioProcessor`]): its processor, with the codec.
        audio: a path, a `(waveform, sampling_rate)` tuple or a 24 kHz waveform; a list of those for several
            recordings (their segments share the batches).
        language (`"zh"`, `"en"` or `None`): MiMo-V2.5-ASR's language tag (see `MiMoAudioProcessor.asr`).
        instruction (`str`, *optional*): the request after each segment's audio (see `MiMoAudioProcessor.asr`;
            MiMo-V2.5-ASR draws one per segment with `random.choice` when it is `None`, so seed `random` to repeat
            a run exactly).
        batch_size (`int`): segments per `generate` call.
        max_segment_seconds, min_pause_seconds, vad: how to cut (see [`find_speech_segments`]).
        max_new_tokens (`int`): most text tokens per segment.
        generation_kwargs (`dict`, *optional*): overrides of `processor.generation_kwargs("asr")`.
        progress (`Callable[[int, int], None]`, *optional*): called with (segments done, segments in all).

    Returns:
        a [`Transcription`] per recording (one, or a list for a list input).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    processor._language_tag(language)  # an unknown language or a tag for MiMo-Audio fails before any work
    recordings = audio if isinstance(audio, list) else [audio]
    if not recordings:
        raise ValueError("`audio` is an empty list.")
    loaded = [_load_recording(item, index) for index, item in enumerate(recordings)]

    pieces = []  # (recording, start s, end s)
    for index, (waveform, rate) in enumerate(loaded):
        segments = find_speech_segments(waveform, rate, max_segment_seconds, min_pause_seconds, vad)
        duration = waveform.shape[-1] / rate
        if segments and duration <= max_segment_seconds:
            segments = [(0.0, duration)]  # short enough: the whole recording, as `processor.asr` reads it
        pieces.extend((index, start, end) for start, end in segments)
    order = sorted(range(len(pieces)), key=lambda i: pieces[i][2] - pieces[i][1], reverse=True)
    settings = {**processor.generation_kwargs("asr"), **(generation_kwargs or {}), "max_new_tokens": max_new_tokens}
    texts = [""] * len(pieces)
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        clips = []
        for piece in batch:
            index, start, end = pieces[piece]
            waveform, rate = loaded[index]
            clips.append((waveform[round(start * rate) : round(end * rate)], rate))
        inputs = processor.asr(clips, language=language, instruction=instruction).to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, **settings, return_dict_in_generate=True)
        decoded = processor.batch_decode_generation(
            output, prompt_length=inputs["input_ids"].shape[1], decode_audio=False
        )
        for piece, text in zip(batch, decoded.text):
            texts[piece] = text
        if progress is not None:
            progress(min(first + batch_size, len(order)), len(order))

    results = []
    for index, (waveform, rate) in enumerate(loaded):
        segments = [
            TranscriptionSegment(start=start, end=end, text=texts[piece])
            for piece, (owner, start, end) in enumerate(pieces)
            if owner == index
        ]
        results.append(
            Transcription(
                text=join_segment_texts([segment.text for segment in segments]),
                segments=segments,
                duration=waveform.shape[-1] / rate,
            )
        )
    return results if isinstance(audio, list) else results[0]
