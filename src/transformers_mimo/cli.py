"""The `mimo-audio` command: MiMo-Audio tasks, the codec round trip, checkpoint conversion and an offline demo.

    mimo-audio demo                                      # tiny bundled random checkpoints, no network
    mimo-audio tts "Today is a nice day." --output day.wav [--instruct STYLE] [--voice PROMPT.wav]
    mimo-audio asr speech.wav [more.wav ...] [--language zh|en] [--batch-size 8] [--timestamps]
                   [--output-format txt|json|srt] [--output-dir DIR]
    mimo-audio understand clip.wav --question "What is happening?" [--thinking]
    mimo-audio chat --audio question.wav [--text ...] [--assistant ...] [--system ...] [--output reply.wav]
    mimo-audio reconstruct speech.wav --output speech_codec.wav [--num-quantizers 8]
    mimo-audio convert {lm,tokenizer} --input_dir ... --output_dir ...

The model commands load the language model from `--model` (default `XiaomiMiMo/MiMo-Audio-7B-Instruct`) and the
codec from `--audio-tokenizer` (default: the `audio_tokenizer/` folder of a converted `--model` directory, else
`XiaomiMiMo/MiMo-Audio-Tokenizer`); both may be Hub ids or local directories, in the original or the converted format.
Results go to stdout, progress and loading messages to stderr. Exit codes: 0 success, 1 runtime failure, 2 usage or
input error.
"""

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from .conversion_utils import DTYPES, EXIT_FAILURE, EXIT_USAGE


DEFAULT_MODEL = "XiaomiMiMo/MiMo-Audio-7B-Instruct"
DEFAULT_AUDIO_TOKENIZER = "XiaomiMiMo/MiMo-Audio-Tokenizer"
DEMO_DIR = Path(__file__).with_name("demo")


class CLIError(Exception):
    """An expected failure: its message is printed without a traceback and the command exits with `exit_code`."""

    exit_code = EXIT_FAILURE


class InputError(CLIError):
    """Bad arguments or input files."""

    exit_code = EXIT_USAGE


# ----------------------------------------------------------------------------------------------------------- checks


def _check_input_file(path: str, what: str = "audio file") -> str:
    """An existing audio file soundfile can read (checked before any model is loaded)."""
    import soundfile as sf

    if not os.path.exists(path):
        raise InputError(f"{what} {path!r} does not exist.")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path!r} is not a file.")
    try:
        sf.info(path)
    except Exception as error:  # soundfile raises several error types for unreadable files
        raise InputError(f"cannot read {what} {path!r} as audio ({error}).") from error
    return path


def _check_output_file(path: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {str(path)!r} is a directory; give a file name such as {str(path / 'out.wav')!r}.")
    if not path.parent.is_dir():
        raise InputError(f"the folder of the output file {str(path)!r} does not exist.")
    if path.suffix.lower() not in (".wav", ".flac", ".ogg"):
        raise InputError(f"output {str(path)!r} must end in .wav, .flac or .ogg.")
    return path


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (`owner/name`)."""
    return (
        os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
    )


def _check_checkpoint(name: str, option: str, kind: str) -> str:
    """
    A local checkpoint directory with a `config.json` of the right `kind` (`"lm"`: a MiMo-Audio language model,
    original or converted; `"codec"`: a MiMo-Audio-Tokenizer), or a Hub id (resolved when loading). Checked before
    anything is built: a wrong config would otherwise build the full-size default model.
    """
    if os.path.exists(name):
        config_path = os.path.join(name, "config.json")
        if not os.path.isfile(config_path):
            raise InputError(f"{option} {name!r} is not a checkpoint directory (no config.json in it).")
        _check_config_kind(config_path, option, kind)
        return name
    if _looks_local(name):
        raise InputError(f"{option} {name!r}: no such directory.")
    return name


def _check_config_kind(config_path: str, option: str, kind: str):
    from .configuration_mimo_audio import is_original_config_dict

    try:
        with open(config_path) as file:
            config = json.load(file)
    except (OSError, ValueError) as error:
        raise InputError(f"{option}: cannot read {config_path!r} as JSON ({error}).") from error
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if kind == "lm":
        if model_type != "mimo_audio" and not is_original_config_dict(config):
            raise InputError(
                f"{option} {os.path.dirname(config_path)!r} is not a MiMo-Audio language model (its config.json has "
                f"model_type {model_type!r}; expected 'mimo_audio' or an original MiMo-Audio config)."
            )
    elif model_type not in (None, "mimo_audio_tokenizer") or is_original_config_dict(config):
        raise InputError(
            f"{option} {os.path.dirname(config_path)!r} is not a MiMo-Audio audio tokenizer (its config.json has "
            f"model_type {model_type!r}; expected 'mimo_audio_tokenizer')."
        )


# ---------------------------------------------------------------------------------------------------------- loading


def _check_device(device: str) -> str:
    """`--device`: a device name torch knows, whose backend is available on this machine (checked by `main` before
    any command runs)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"--device {device!r} is not a device (use cuda, cuda:1, mps or cpu).") from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu).")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device!r}: MPS is not available on this machine (use --device cpu).")
    elif parsed.type not in ("cuda", "mps", "cpu"):
        raise InputError(f"--device {device!r} is not supported (use cuda, cuda:1, mps or cpu).")
    return device


def _resolve_device_and_dtype(args) -> tuple[str, torch.dtype]:
    device = args.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    return device, dtype


def load_audio_tokenizer(path: str, device: str, dtype: torch.dtype):
    """The codec from an original or converted directory (or Hub id), in eval mode on `device`."""
    from .modeling_mimo_audio_tokenizer import MiMoAudioTokenizerModel

    print(f"Loading the audio tokenizer from {path} ...", file=sys.stderr)
    try:
        codec = MiMoAudioTokenizerModel.from_pretrained(path, dtype=dtype)
    except OSError as error:
        raise CLIError(f"cannot load the audio tokenizer from {path!r}: {error}") from error
    return codec.to(device).eval()


def load_model_and_processor(args):
    """
    The language model and its `MiMoAudioProcessor` (text tokenizer from the model directory, which may be an original
    checkpoint without processor files; feature extractor matching the codec).
    """
    from .modeling_mimo_audio import MiMoAudioForConditionalGeneration
    from .processing_mimo_audio import MiMoAudioProcessor
    from .quantization_mimo_audio import QUANTIZATION_SKIP_MODULES

    model_path = _check_checkpoint(args.model, "--model", kind="lm")
    codec_path = args.audio_tokenizer
    if codec_path is None:
        bundled = os.path.join(model_path, "audio_tokenizer")
        codec_path = bundled if os.path.isfile(os.path.join(bundled, "config.json")) else DEFAULT_AUDIO_TOKENIZER
    codec_path = _check_checkpoint(codec_path, "--audio-tokenizer", kind="codec")
    device, dtype = _resolve_device_and_dtype(args)

    load_kwargs = {"dtype": dtype}
    if args.load_in_4bit or args.load_in_8bit:
        from transformers import BitsAndBytesConfig

        # Only the LLM's linear layers are quantized (see quantization_mimo_audio.QUANTIZATION_SKIP_MODULES).
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=args.load_in_4bit,
            load_in_8bit=args.load_in_8bit,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES),
        )
        load_kwargs["device_map"] = {"": device}
    print(f"Loading the model from {model_path} ...", file=sys.stderr)
    try:
        model = MiMoAudioForConditionalGeneration.from_pretrained(model_path, **load_kwargs)
    except (OSError, ImportError) as error:
        raise CLIError(f"cannot load the model from {model_path!r}: {error}") from error
    if "device_map" not in load_kwargs:
        model.to(device)
    model.eval()

    codec = load_audio_tokenizer(codec_path, device, dtype)
    try:
        processor = MiMoAudioProcessor.from_pretrained(model_path, audio_tokenizer=codec)
    except OSError as error:
        raise CLIError(f"cannot load the text tokenizer from {model_path!r}: {error}") from error
    return model, processor


# ------------------------------------------------------------------------------------------------------- generation


class GenerationProgress(BaseStreamer):
    """A `generate` streamer that advances a progress bar per generated position and counts the speech patches."""

    def __init__(self, total: int, empty_token_id: int, description: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, unit="pos", file=sys.stderr, disable=None, leave=False)
        self.empty_token_id = empty_token_id
        self.speech_patches = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor):
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.speech_patches += int((value == self.empty_token_id).sum())
        self.bar.update(1)
        self.bar.set_postfix(speech_patches=self.speech_patches, refresh=False)

    def end(self):
        self.bar.close()


def _generation_config(model, processor, args, task: str):
    """The checkpoint's generation settings (the original's defaults when it stores none), then the task's stop tokens
    and sampling as the original runs it, then the command line's length, `--greedy` and return options."""
    from .generation_mimo_audio import default_generation_config

    tokenizer = processor.tokenizer
    config = copy.deepcopy(model.generation_config)
    if getattr(config, "audio_temperature", None) is None:  # an original checkpoint: no sampling defaults stored
        config = default_generation_config(model.config, tokenizer)
    for key, value in processor.generation_kwargs(task).items():
        setattr(config, key, value)
    config.max_length = None
    config.max_new_tokens = args.max_new_tokens
    config.pad_token_id = tokenizer.pad_token_id
    config.return_dict_in_generate = True
    if args.greedy:
        config.do_sample = False
        config.audio_do_sample = False
    return config


def _set_seed(seed: int):
    """Seeds Python, NumPy and torch, as `transformers.set_seed` does, without importing `transformers.trainer_utils`
    (which imports peft and with it bitsandbytes, whose kernel loading prints a warning on commands that do not
    quantize)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_generation(model, processor, inputs, args, task: str, description: str):
    """`generate` as the original runs `task` (see `MiMoAudioProcessor.generation_kwargs`), with a progress bar, then
    `batch_decode_generation` (with audio when the task answers in speech). Returns `(text, waveform or None, speech patches)`."""
    from .prompting_mimo_audio import get_task

    generation_config = _generation_config(model, processor, args, task)
    speech = get_task(task).output_modality == "audio"
    if args.seed is not None:
        _set_seed(args.seed)
    progress = GenerationProgress(args.max_new_tokens, processor.empty_token_id, description)
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=generation_config, streamer=progress)
        decoded = processor.batch_decode_generation(
            output, prompt_length=inputs["input_ids"].shape[1], decode_audio=speech
        )
    return decoded.text[0], decoded.audio[0], progress.speech_patches


def _write_speech(processor, waveform, path: Path, patches: int) -> str:
    if waveform is None:
        raise CLIError(
            "no speech was generated (the model stopped before producing any audio patch); try again with another "
            "--seed or a larger --max-new-tokens."
        )
    processor.save_audio(waveform, path)
    seconds = waveform.shape[-1] / processor.sampling_rate
    return f"speech: {patches} patch(es), {seconds:.2f} s at {processor.sampling_rate} Hz -> {path}"


# --------------------------------------------------------------------------------------------------------- commands


def cmd_tts(args) -> int:
    output = _check_output_file(args.output)
    voice = None if args.voice is None else _check_input_file(args.voice, "voice prompt")
    if not args.text.strip():
        raise InputError("the text to speak is empty.")
    model, processor = load_model_and_processor(args)
    voice = None if voice is None else _encoded_audio(processor, voice)
    inputs = processor.tts(args.text, style=args.instruct, voice=voice)
    text, waveform, patches = run_generation(model, processor, inputs, args, task="tts", description="tts")
    print(f"text: {text}")
    print(_write_speech(processor, waveform, output, patches))
    return 0


def _srt_time(seconds: float) -> str:
    milliseconds = round(seconds * 1000)
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d},{rest % 1000:03d}"


def format_transcription(result, path: str, output_format: str, timestamps: bool) -> str:
    """One file's transcript as `txt` (the text, or `[start - end] text` lines), `json` or `srt`."""
    import json

    if output_format == "json":
        record = {"file": path, "duration": round(result.duration, 3), "text": result.text}
        if timestamps:
            record["segments"] = [vars(segment) for segment in result.segments]
        return json.dumps(record, ensure_ascii=False)
    if output_format == "srt":
        return "\n".join(
            f"{index}\n{_srt_time(segment.start)} --> {_srt_time(segment.end)}\n{segment.text}\n"
            for index, segment in enumerate(result.segments, start=1)
        )
    if timestamps:
        return "\n".join(f"[{segment.start:.2f} - {segment.end:.2f}] {segment.text}" for segment in result.segments)
    return result.text


def _write_new_file(path: Path, content: str):
    """Write `content` to a new file through a temporary file in the same folder (never over an existing file)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(content)
    try:
        os.link(handle.name, path)  # fails if `path` appeared meanwhile, unlike a rename
    except FileExistsError:
        raise InputError(f"{str(path)!r} already exists; not overwriting it.") from None
    finally:
        os.unlink(handle.name)


def cmd_asr(args) -> int:
    import soundfile as sf

    from .configuration_mimo_audio import MiMoAudioConfig
    from .transcription_mimo_audio import transcribe

    files = [_check_input_file(path) for path in args.audio]
    for path in files:
        if sf.info(path).frames == 0:
            raise InputError(f"audio file {path!r} holds no samples.")
    if args.batch_size < 1:
        raise InputError("--batch-size must be positive.")
    if args.max_segment_seconds < 1:
        raise InputError("--max-segment-seconds must be at least 1.")
    targets = None
    if args.output_dir is not None:
        folder = Path(args.output_dir)
        if not folder.is_dir():
            raise InputError(f"--output-dir {str(folder)!r} is not a directory.")
        targets = [folder / f"{Path(path).stem}.{args.output_format}" for path in files]
        clashes = [str(target) for target in targets if target.exists()] or (
            [str(targets[0])] if len(set(targets)) < len(targets) else []
        )
        if clashes:
            raise InputError(f"{clashes[0]!r} already exists or two inputs share a name; not overwriting it.")
    elif args.output_format == "srt" and len(files) > 1:
        raise InputError("--output-format srt with several files needs --output-dir (one .srt per file).")
    if args.language is not None:
        variant = MiMoAudioConfig.from_pretrained(_check_checkpoint(args.model, "--model", kind="lm")).model_variant
        if variant != "mimo-v2.5-asr":
            raise InputError(
                f"--language needs a MiMo-V2.5-ASR checkpoint; {args.model!r} is {variant!r}, which was not trained "
                "with language tags."
            )

    model, processor = load_model_and_processor(args)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    bar, progress = _progress_bar("asr", "segment")
    overrides = {"do_sample": False, "audio_do_sample": False} if args.greedy else {}
    results = transcribe(
        model,
        processor,
        files,
        language=args.language,
        batch_size=args.batch_size,
        max_segment_seconds=args.max_segment_seconds,
        max_new_tokens=args.max_new_tokens,
        generation_kwargs=overrides,
        progress=progress,
    )
    bar.close()
    outputs = [
        format_transcription(result, path, args.output_format, args.timestamps) for path, result in zip(files, results)
    ]
    if targets is not None:
        for target, output in zip(targets, outputs):
            _write_new_file(target, output + "\n")
            print(f"{target}", file=sys.stderr)
    elif args.output_format == "txt" and len(files) > 1:
        for path, output in zip(files, outputs):
            print(f"{path}\t{output}" if not args.timestamps else f"== {path}\n{output}")
    else:
        print("\n".join(outputs))
    return 0


def cmd_understand(args) -> int:
    audio = _check_input_file(args.audio)
    if not args.question.strip():
        raise InputError("--question is empty.")
    model, processor = load_model_and_processor(args)
    inputs = processor.audio_understanding(_encoded_audio(processor, audio), args.question, thinking=args.thinking)
    text, _, _ = run_generation(model, processor, inputs, args, task="audio_understanding", description="understand")
    print(text)
    return 0


class _AppendTurn(argparse.Action):
    """`--text` / `--audio` add an item to the current user turn, `--assistant` adds an earlier reply, in order."""

    def __call__(self, parser, namespace, value, option_string=None):
        turns = list(getattr(namespace, self.dest) or [])
        turns.append((option_string.lstrip("-"), value))
        setattr(namespace, self.dest, turns)


def _chat_messages(turns: list[tuple[str, str]]) -> list[dict]:
    messages, items = [], []
    for kind, value in turns:
        if kind == "assistant":
            if not items:
                raise InputError("--assistant must follow the user turn it answers (--text / --audio).")
            messages += [{"role": "user", "content": items}, {"role": "assistant", "content": value}]
            items = []
        elif kind == "audio":
            items.append({"type": "audio", "path": _check_input_file(value)})
        else:
            items.append({"type": "text", "text": value})
    if not items:
        raise InputError(
            "the conversation must end with a user turn: add --text and/or --audio after the last --assistant."
        )
    return messages + [{"role": "user", "content": items}]


def cmd_chat(args) -> int:
    if not args.turns:
        raise InputError("give the user turn with --text and/or --audio.")
    messages = _chat_messages(args.turns)
    output = None if args.output is None else _check_output_file(args.output)
    voice = None if args.voice is None else _check_input_file(args.voice, "voice prompt")
    if voice is not None and output is None:
        raise InputError("--voice sets the voice of a spoken reply: add --output reply.wav.")
    model, processor = load_model_and_processor(args)
    for message in messages:
        if isinstance(message["content"], list):
            message["content"] = [
                _encoded_audio(processor, item["path"]) if item["type"] == "audio" else item
                for item in message["content"]
            ]
    from .prompting_mimo_audio import get_task

    voice = None if voice is None else _encoded_audio(processor, voice)
    task = "spoken_dialogue" if output is not None else "speech_to_text_dialogue"
    inputs = processor.spoken_dialogue(
        messages, system_prompt=args.system, voice=voice, output_modality=get_task(task).output_modality
    )
    text, waveform, patches = run_generation(model, processor, inputs, args, task=task, description="chat")
    print(text)
    if output is not None:
        print(_write_speech(processor, waveform, output, patches))
    return 0


def _progress_bar(description: str, unit: str):
    """A progress bar on stderr and the `progress(done, total)` callback that advances it."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=description, unit=unit, file=sys.stderr, disable=None, leave=False)

    def progress(done: int, total: int):
        bar.total = total
        bar.update(done - bar.n)

    return bar, progress


def encode_waveform(codec, feature_extractor, waveform: torch.Tensor, sampling_rate: int, num_quantizers: int | None):
    """
    Waveform `(channels, samples)` -> codes `(num_quantizers, frames)`, one codec segment (`config.segment_length` mel
    frames, encoded independently anyway, so the codes equal one `encode` call) at a time with a progress bar.
    """
    features = feature_extractor(waveform, sampling_rate=sampling_rate)["input_features"][0]
    bar, progress = _progress_bar("encode", "segment")
    with torch.inference_mode():
        (codes,) = codec.encode_clips([features], num_quantizers, segments_per_call=1, progress=progress)
    bar.close()
    return codes


def read_audio(path: str) -> tuple[torch.Tensor, int]:
    """An audio file as a float32 waveform `(channels, samples)` and its sampling rate."""
    from .audio_utils import read_audio as read_audio_file

    waveform, rate = read_audio_file(path=path)
    if waveform.shape[-1] == 0:
        raise InputError(f"{path!r} holds no samples.")
    return waveform, rate


def _encoded_audio(processor, path: str) -> dict:
    """An audio file as a content item of precomputed codes, encoded with a progress bar (long files take a while);
    the processor would compute the same codes from the path. A MiMo-V2.5-ASR processor encodes with its own recipe."""
    if processor.model_variant == "mimo-v2.5-asr":
        (patches,) = processor.encode_audio(path)
        return {"type": "audio", "audio_codes": patches.reshape(-1, processor.audio_channels).T}
    waveform, rate = read_audio(path)
    codes = encode_waveform(
        processor.audio_tokenizer, processor.feature_extractor, waveform, rate, processor.audio_channels
    )
    return {"type": "audio", "audio_codes": codes}


def reconstruct(codec, feature_extractor, waveform: torch.Tensor, sampling_rate: int, num_quantizers: int | None):
    """
    Codec round trip of one clip: waveform `(channels, samples)` -> codes `(num_quantizers, frames)`
    (`encode_waveform`) -> waveform `(samples,)` at the codec's rate, decoded in segments of 1500 code frames as the
    processor decodes generated speech (`MiMoAudioTokenizerModel.decode_clips`), one segment at a time with a progress
    bar; a clip shorter than 60 s is one codec call each way.
    """
    codes = encode_waveform(codec, feature_extractor, waveform, sampling_rate, num_quantizers)
    bar, progress = _progress_bar("decode", "segment")
    with torch.inference_mode():
        (audio,) = codec.decode_clips([codes], segments_per_call=1, progress=progress)
    bar.close()
    return codes, audio


def cmd_reconstruct(args) -> int:
    import soundfile as sf

    from .feature_extraction_mimo_audio import MiMoAudioFeatureExtractor

    source = _check_input_file(args.input)
    output = _check_output_file(args.output)
    device, dtype = _resolve_device_and_dtype(args)
    codec_path = _check_checkpoint(args.audio_tokenizer, "--audio-tokenizer", kind="codec")
    codec = load_audio_tokenizer(codec_path, device, dtype)
    if args.num_quantizers is not None and not 1 <= args.num_quantizers <= codec.config.num_quantizers:
        raise InputError(
            f"--num-quantizers must be between 1 and {codec.config.num_quantizers}, got {args.num_quantizers}."
        )
    waveform, rate = read_audio(source)  # (channels, samples); the feature extractor downmixes and resamples
    feature_extractor = MiMoAudioFeatureExtractor.from_audio_tokenizer_config(codec.config)
    codes, audio = reconstruct(codec, feature_extractor, waveform, rate, args.num_quantizers)
    rate_out = codec.config.sampling_rate
    # 32-bit float WAV, so the file holds the codec output exactly.
    sf.write(output, audio.numpy(), rate_out, subtype="FLOAT" if output.suffix.lower() == ".wav" else None)
    print(f"input: {source}, {waveform.shape[1] / rate:.2f} s at {rate} Hz, {waveform.shape[0]} channel(s)")
    print(f"codes: {tuple(codes.shape)} (quantizers, frames at {codec.config.frame_rate:g} Hz)")
    print(f"output: {output}, {audio.shape[0] / rate_out:.2f} s at {rate_out} Hz ({audio.shape[0]} samples)")
    return 0


def cmd_convert(args) -> int:
    if args.what == "lm":
        from .convert_mimo_audio_to_hf import main as convert_main
    else:
        from .convert_mimo_audio_tokenizer_to_hf import main as convert_main
    # Usage errors of the script's own arguments exit with 2; failed conversions (a missing or mismatched input, an
    # output that exists) with 1, whether the script raises or exits with a message.
    try:
        convert_main(args.arguments)
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        raise CLIError(str(exit.code).removeprefix("error: ")) from None
    return 0


# ------------------------------------------------------------------------------------------------------------- demo


def _demo_question(sampling_rate: int, seconds: float = 1.5) -> torch.Tensor:
    """A synthetic spoken-question stand-in: a vowel-like tone with a rising pitch, `(samples,)` at `sampling_rate`."""
    time = torch.arange(int(seconds * sampling_rate)) / sampling_rate
    pitch = 140.0 + 60.0 * time / seconds
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / sampling_rate
    voice = sum(torch.sin(harmonic * phase) / harmonic for harmonic in (1, 2, 3, 4))
    return 0.2 * voice * torch.sin(math.pi * time / seconds)


def cmd_demo(args) -> int:
    output = _check_output_file(args.output)
    dialogue_output = output.with_name(f"{output.stem}-dialogue{output.suffix}")
    args.model = str(DEMO_DIR / "lm")
    args.audio_tokenizer = str(DEMO_DIR / "audio_tokenizer")
    args.device, args.dtype, args.load_in_4bit, args.load_in_8bit = "cpu", "float32", False, False
    model, processor = load_model_and_processor(args)

    print("MiMo-Audio demo on tiny RANDOMLY INITIALISED test checkpoints (bundled, no network):")
    print(f"  model: {args.model}")
    print(f"  audio tokenizer: {args.audio_tokenizer}")
    print(f"  generation: sampling with seed {args.seed}, at most {args.max_new_tokens} positions")

    sentence = "Hello from MiMo-Audio."
    print(f"\n[1] Text to speech: processor.tts({sentence!r}) -> model.generate -> processor.batch_decode_generation")
    inputs = processor.tts(sentence)
    text, waveform, patches = run_generation(model, processor, inputs, args, task="tts", description="tts")
    print(f"  generated text: {text!r}")
    print("  " + _write_speech(processor, waveform, output, patches))

    question = _demo_question(processor.sampling_rate)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": question}]}]
    print(
        f"\n[2] Spoken dialogue: a synthetic {question.shape[0] / processor.sampling_rate:.1f} s tone as the user's "
        "speech -> processor.spoken_dialogue -> model.generate -> processor.batch_decode_generation"
    )
    inputs = processor.spoken_dialogue(conversation)
    text, waveform, patches = run_generation(
        model, processor, inputs, args, task="spoken_dialogue", description="dialogue"
    )
    print(f"  generated text: {text!r}")
    print("  " + _write_speech(processor, waveform, dialogue_output, patches))

    print(
        "\nThe weights are random, so the text is gibberish and the audio is noise, not speech. Use --model and "
        "--audio-tokenizer with the real checkpoints (e.g. `mimo-audio tts ...`) for meaningful output."
    )
    return 0


# ----------------------------------------------------------------------------------------------------------- parser


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"LM checkpoint: Hub id or directory (default {DEFAULT_MODEL})"
    )
    group.add_argument(
        "--audio-tokenizer",
        default=None,
        help="codec checkpoint: Hub id or directory (default: MODEL/audio_tokenizer if present, else "
        f"{DEFAULT_AUDIO_TOKENIZER})",
    )
    _device_options(group)
    quantization = parent.add_mutually_exclusive_group()
    quantization.add_argument(
        "--load-in-4bit", action="store_true", help="quantize the LLM's linear layers to 4 bits (bitsandbytes)"
    )
    quantization.add_argument(
        "--load-in-8bit", action="store_true", help="quantize the LLM's linear layers to 8 bits (bitsandbytes)"
    )
    _generation_options(parent.add_argument_group("generation"), max_new_tokens=1024, seed=None)
    return parent


def _device_options(group):
    group.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: cuda if available, else cpu)")
    group.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights dtype (default: bfloat16 on cuda, else float32)",
    )


def _generation_options(group, max_new_tokens: int, seed: int | None):
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"most positions to generate (default {max_new_tokens})",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=seed,
        help="random seed for sampling" + (f" (default {seed})" if seed is not None else ""),
    )
    group.add_argument("--greedy", action="store_true", help="greedy decoding of text and audio instead of sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimo-audio",
        description="MiMo-Audio: text to speech, speech recognition, audio understanding, spoken chat, codec round "
        "trips and checkpoint conversion.",
        epilog="Run `mimo-audio demo` to try the whole pipeline offline on tiny random checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model = _model_options()

    tts = commands.add_parser("tts", parents=[model], help="text to speech")
    tts.add_argument("text", help="the text to speak")
    tts.add_argument("--output", required=True, help="WAV file to write")
    tts.add_argument(
        "--instruct", default=None, metavar="STYLE", help='style instruction, e.g. "speak slowly and calmly"'
    )
    tts.add_argument("--voice", default=None, metavar="PROMPT.wav", help="voice prompt to clone")
    tts.set_defaults(handler=cmd_tts)

    asr = commands.add_parser(
        "asr",
        parents=[model],
        help="speech recognition of audio files of any length",
        description="Transcribe audio files (MiMo-V2.5-ASR or MiMo-Audio-7B-Instruct). Files longer than "
        "--max-segment-seconds are cut at pauses and their segments transcribed in batches.",
    )
    asr.add_argument("audio", nargs="+", help="audio files (wav, flac, mp3, ...)")
    asr.add_argument(
        "--language", choices=["zh", "en"], default=None, help="MiMo-V2.5-ASR only: the language to transcribe in"
    )
    asr.add_argument("--batch-size", type=int, default=8, help="segments per generate call (default 8)")
    asr.add_argument("--max-segment-seconds", type=float, default=30.0, help="longest segment in seconds (default 30)")
    asr.add_argument("--timestamps", action="store_true", help="print each segment with its start and end")
    asr.add_argument("--output-format", choices=["txt", "json", "srt"], default="txt", help="default txt")
    asr.add_argument(
        "--output-dir",
        default=None,
        help="write FILE_STEM.FORMAT per input here instead of printing (never overwrites)",
    )
    asr.set_defaults(handler=cmd_asr)

    understand = commands.add_parser("understand", parents=[model], help="answer a question about an audio clip")
    understand.add_argument("audio", help="audio file")
    understand.add_argument("--question", required=True, help="the question")
    understand.add_argument("--thinking", action="store_true", help="let the model reason first")
    understand.set_defaults(handler=cmd_understand)

    chat = commands.add_parser(
        "chat",
        parents=[model],
        help="chat with text and spoken turns",
        description="Turns in order: --text and --audio add to the current user turn, --assistant adds an earlier "
        "reply. The answer is text, or speech with --output.",
    )
    for option, help_text in (
        ("--text", "text in the user turn"),
        ("--audio", "audio file in the user turn"),
        ("--assistant", "an earlier assistant reply (text), ending the user turn before it"),
    ):
        chat.add_argument(option, dest="turns", action=_AppendTurn, metavar=option.strip("-").upper(), help=help_text)
    chat.add_argument("--system", default=None, help="system prompt (put at the start of the first user turn)")
    chat.add_argument("--output", default=None, help="answer in speech and write it to this WAV file")
    chat.add_argument("--voice", default=None, metavar="PROMPT.wav", help="voice prompt for the spoken answer")
    chat.set_defaults(handler=cmd_chat)

    rebuild = commands.add_parser(
        "reconstruct", help="codec round trip of an audio file: encode to codes, decode to WAV"
    )
    rebuild.add_argument("input", help="audio file")
    rebuild.add_argument("--output", required=True, help="WAV file to write (32-bit float)")
    rebuild.add_argument(
        "--num-quantizers", type=int, default=None, help="quantizers to keep (default: all; the LM uses 8)"
    )
    rebuild.add_argument(
        "--audio-tokenizer",
        default=DEFAULT_AUDIO_TOKENIZER,
        help=f"codec: Hub id or directory (default {DEFAULT_AUDIO_TOKENIZER})",
    )
    _device_options(rebuild)
    rebuild.set_defaults(handler=cmd_reconstruct)

    convert = commands.add_parser(
        "convert",
        help="convert an original checkpoint to the Hugging Face layout",
        description="`convert lm ARGS` runs transformers_mimo.convert_mimo_audio_to_hf, `convert tokenizer ARGS` "
        "runs transformers_mimo.convert_mimo_audio_tokenizer_to_hf; `convert lm --help` lists their arguments.",
    )
    convert.add_argument("what", choices=["lm", "tokenizer"], help="which checkpoint")
    convert.add_argument("arguments", nargs=argparse.REMAINDER, help="arguments of the conversion script")
    convert.set_defaults(handler=cmd_convert)

    demo = commands.add_parser("demo", help="run TTS and a spoken-dialogue turn on tiny bundled random checkpoints")
    demo.add_argument(
        "--output",
        default="demo.wav",
        help="WAV of the TTS answer (default demo.wav; the dialogue answer goes to <name>-dialogue.wav)",
    )
    _generation_options(demo, max_new_tokens=40, seed=0)
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help (0) or a usage error (2), already printed by argparse
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    if getattr(args, "max_new_tokens", 1) < 1:
        print(f"mimo-audio {args.command}: error: --max-new-tokens must be positive.", file=sys.stderr)
        return EXIT_USAGE
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        print(f"mimo-audio {args.command}: error: --seed must be in [0, 2**32), got {seed}.", file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "device", None) is not None:
        try:
            _check_device(args.device)
        except InputError as error:
            print(f"mimo-audio {args.command}: error: {error}", file=sys.stderr)
            return EXIT_USAGE

    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # Transformers' warnings would drown the command's own messages
    try:
        return args.handler(args)
    except CLIError as error:
        print(f"mimo-audio {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        print(f"mimo-audio {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"mimo-audio {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.set_verbosity(verbosity)


if __name__ == "__main__":
    sys.exit(main())
