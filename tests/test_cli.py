"""The `mimo-audio` command line: demo, reconstruct, asr and tts end to end in a subprocess (the installed
`mimo-audio` console script) on the tiny golden checkpoints, checked against the same pipeline run in-process through the
library; the other commands and the error paths in-process through `main(argv)`."""

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AUDIO, GOLDEN
from transformers import AutoTokenizer, set_seed

from transformers_mimo import cli
from transformers_mimo.feature_extraction_mimo_audio import MiMoAudioFeatureExtractor
from transformers_mimo.generation_mimo_audio import default_generation_config
from transformers_mimo.modeling_mimo_audio import MiMoAudioForConditionalGeneration
from transformers_mimo.modeling_mimo_audio_tokenizer import MiMoAudioTokenizerModel
from transformers_mimo.processing_mimo_audio import MiMoAudioProcessor


LM = GOLDEN / "lm_a" / "checkpoint"
CODEC = GOLDEN / "tok_a" / "checkpoint"
MODEL_ARGS = ["--model", str(LM), "--audio-tokenizer", str(CODEC), "--device", "cpu"]
SRC = Path(__file__).resolve().parents[1] / "src"
SPEECH_LINE = re.compile(r"speech: (\d+) patch\(es\), ([\d.]+) s at (\d+) Hz -> (.+)")
PCM16_STEP = 1 / 32768  # generation outputs are written as 16-bit PCM WAV


def _console_script() -> str:
    """The `mimo-audio` script that installing the package put next to this Python (or on PATH)."""
    script = Path(sys.executable).with_name("mimo-audio")
    found = str(script) if script.is_file() else shutil.which("mimo-audio")
    assert found, "the `mimo-audio` console script is not installed: run `pip install -e .` first"
    return found


def _run_cli(*args, cwd):
    """`mimo-audio ARGS` offline, with the thread count of the in-process references."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
    }
    command = [_console_script(), *map(str, args)]
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, timeout=600)
    # Decoded without newline translation, so that generated text (any characters) comes back exactly.
    stdout, stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8", errors="replace")
    return subprocess.CompletedProcess(result.args, result.returncode, stdout, stderr)


def _processor(lm_dir, codec_dir):
    model = MiMoAudioForConditionalGeneration.from_pretrained(lm_dir).eval()
    codec = MiMoAudioTokenizerModel.from_pretrained(codec_dir).eval()
    config = codec.config
    feature_extractor = MiMoAudioFeatureExtractor.from_audio_tokenizer_config(config)
    processor = MiMoAudioProcessor(
        feature_extractor,
        AutoTokenizer.from_pretrained(lm_dir),
        audio_tokenizer=codec,
        group_size=model.config.group_size,
        audio_channels=model.config.audio_channels,
        audio_empty_ids=model.config.audio_empty_ids,
    )
    return model, processor


@pytest.fixture(scope="module")
def pipeline():
    return _processor(LM, CODEC)


def _generate(model, processor, inputs, task, max_new_tokens, seed=None):
    """The library pipeline: generate (the original's defaults, then `task`'s stop tokens and sampling; greedy without
    `seed`) -> batch_decode_generation."""
    config = default_generation_config(model.config, processor.tokenizer)
    config.update(**processor.generation_kwargs(task))
    config.max_length = None
    if seed is None:
        config.do_sample = config.audio_do_sample = False
    else:
        set_seed(seed)
    output = model.generate(
        **inputs,
        generation_config=config,
        max_new_tokens=max_new_tokens,
        return_dict_in_generate=True,
    )
    length = inputs["input_ids"].shape[1]
    decoded = processor.batch_decode_generation(output, prompt_length=length)
    patches = int((output.sequences[0, length:] == processor.empty_token_id).sum())
    return decoded.text[0], decoded.audio[0], patches


def _check_speech_file(line, path, expected_audio, expected_patches, samples_per_patch):
    """The printed speech line and the written WAV: 24 kHz mono, the expected samples (16-bit PCM)."""
    match = SPEECH_LINE.fullmatch(line.strip())
    assert match, line
    patches, seconds, rate, written = int(match[1]), float(match[2]), int(match[3]), Path(match[4])
    assert (patches, rate, written.name) == (expected_patches, 24000, path.name)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.frames) == (24000, 1, expected_patches * samples_per_patch)
    assert seconds == pytest.approx(info.frames / 24000, abs=0.005)
    samples, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(samples, np.clip(expected_audio.numpy(), -1, 1), rtol=0, atol=PCM16_STEP)


# ----------------------------------------------------------------------------------------------- subprocess runs


def test_demo_data_are_the_golden_checkpoints():
    """The bundled demo checkpoints are byte copies of the original-format lm_a / tok_a fixtures."""
    for name, fixture in (("lm", LM), ("audio_tokenizer", CODEC)):
        files = sorted(path.name for path in fixture.iterdir())
        assert sorted(path.name for path in (cli.DEMO_DIR / name).iterdir()) == files
        _, mismatch, errors = filecmp.cmpfiles(fixture, cli.DEMO_DIR / name, files, shallow=False)
        assert not mismatch and not errors
    assert (cli.DEMO_DIR / "README.md").is_file()


def test_demo_runs_offline_and_matches_the_library_pipeline(tmp_path):
    """`mimo-audio demo`: no arguments, no network; its two WAVs equal processor -> generate (seed 0, the original's
    sampling, 40 positions) -> batch_decode_generation run in-process on the same checkpoints."""
    result = _run_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "RANDOMLY INITIALISED" in out and "noise, not speech" in out
    model, processor = _processor(cli.DEMO_DIR / "lm", cli.DEMO_DIR / "audio_tokenizer")
    samples_per_patch = processor.group_size * processor.audio_tokenizer.config.samples_per_code
    question = cli._demo_question(processor.sampling_rate)
    requests = {
        "demo.wav": ("tts", processor.tts("Hello from MiMo-Audio.")),
        "demo-dialogue.wav": (
            "spoken_dialogue",
            processor.spoken_dialogue([{"role": "user", "content": [{"type": "audio", "audio": question}]}]),
        ),
    }
    speech_lines = [line for line in out.splitlines() if line.strip().startswith("speech:")]
    text_lines = [line.strip() for line in out.splitlines() if line.strip().startswith("generated text:")]
    assert len(speech_lines) == len(text_lines) == 2
    for (name, (task, inputs)), speech_line, text_line in zip(requests.items(), speech_lines, text_lines):
        text, audio, patches = _generate(model, processor, inputs, task, max_new_tokens=40, seed=0)
        assert patches > 0 and text_line == f"generated text: {text!r}"
        _check_speech_file(speech_line, tmp_path / name, audio, patches, samples_per_patch)


def test_reconstruct_equals_the_codec_round_trip(tmp_path, pipeline):
    """`reconstruct` with 8 quantizers: 24 kHz mono float WAV of codes x 960 samples, equal to encode -> decode
    in-process (same fp32 math, one segment each way; 1e-5)."""
    source = AUDIO / "prompt_speech_en_w.wav"
    output = tmp_path / "rebuilt.wav"
    result = _run_cli(
        "reconstruct", source, "--output", output, "--audio-tokenizer", CODEC, "--num-quantizers", 8, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr

    codec, feature_extractor = pipeline[1].audio_tokenizer, pipeline[1].feature_extractor
    waveform, rate = sf.read(source, dtype="float32")
    features = feature_extractor(waveform, sampling_rate=rate)
    with torch.no_grad():
        codes = codec.encode(features["input_features"], features["input_features_mask"], num_quantizers=8).audio_codes
        expected = codec.decode(codes).audio_values[0, 0]
    frames = codes.shape[-1]
    assert f"codes: (8, {frames}) (quantizers, frames at 25 Hz)" in result.stdout
    assert f"({frames * 960} samples)" in result.stdout
    info = sf.info(output)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (24000, 1, frames * 960, "FLOAT")
    written, _ = sf.read(output, dtype="float32")
    np.testing.assert_allclose(written, expected.numpy(), rtol=0, atol=1e-5)


def test_asr_prints_the_transcript(tmp_path, pipeline):
    """`asr` (greedy, 12 positions) prints exactly the text of processor.asr -> generate -> batch_decode_generation."""
    audio = AUDIO / "weather_today_zh.mp3"
    result = _run_cli("asr", audio, *MODEL_ARGS, "--greedy", "--max-new-tokens", 12, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model, processor = pipeline
    text, _, _ = _generate(model, processor, processor.asr(str(audio)), "asr", max_new_tokens=12)
    assert result.stdout == text + "\n"


def test_tts_writes_the_generated_speech(tmp_path, pipeline):
    """`tts` with a style and a voice prompt (greedy, 12 positions): the printed text and the WAV of processor.tts ->
    generate -> batch_decode_generation."""
    output = tmp_path / "speech.wav"
    voice = AUDIO / "prompt_speech_en_w.wav"
    result = _run_cli(
        "tts",
        "Good morning",
        "--instruct",
        "calm",
        "--voice",
        voice,
        "--output",
        output,
        *MODEL_ARGS,
        "--greedy",
        "--max-new-tokens",
        12,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    model, processor = pipeline
    inputs = processor.tts("Good morning", style="calm", voice=str(voice))
    text, audio, patches = _generate(model, processor, inputs, "tts", 12)
    text_line, speech_line = result.stdout.removesuffix("\n").rsplit("\n", 1)  # the text may hold newlines
    assert text_line == f"text: {text}" and patches > 0
    _check_speech_file(speech_line, output, audio, patches, 4 * 960)


def test_task_sampling_reaches_generate_unchanged(pipeline):
    """The generation config a command builds samples as the task says, whatever the checkpoint stores: no top-k for
    TTS (the original's TTS sampler has none) although the stored defaults have top-k 50, temperature 0.6, no top-p."""
    model, processor = pipeline
    args = argparse.Namespace(max_new_tokens=2, greedy=False)
    config = cli._generation_config(model, processor, args, "tts")
    config.output_scores = config.output_logits = True
    torch.manual_seed(0)
    out = model.generate(**processor.tts("Hello"), generation_config=config)
    vocab_size = model.config.text_config.vocab_size
    assert vocab_size > 50 and torch.isfinite(out.scores[0]).sum() == vocab_size
    torch.testing.assert_close(out.scores[0], out.logits[0] / 0.6)
    assert out.sequences.shape[1] == processor.tts("Hello")["input_ids"].shape[1] + 2


def test_missing_input_file_exits_2_without_traceback(tmp_path):
    result = _run_cli("asr", tmp_path / "missing.wav", *MODEL_ARGS, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"mimo-audio asr: error: audio file '{tmp_path / 'missing.wav'}' does not exist." in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ in-process runs


def test_understand_and_chat_match_the_library_pipeline(tmp_path, pipeline, capsys):
    model, processor = pipeline
    audio = str(AUDIO / "weather_today_zh.mp3")
    assert (
        cli.main(
            [
                "understand",
                audio,
                "--question",
                "What is said?",
                "--thinking",
                *MODEL_ARGS,
                "--greedy",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    inputs = processor.audio_understanding(audio, "What is said?", thinking=True)
    assert (
        capsys.readouterr().out
        == _generate(model, processor, inputs, "audio_understanding", max_new_tokens=8)[0] + "\n"
    )

    reply = tmp_path / "reply.wav"
    argv = [
        "chat",
        "--audio",
        audio,
        "--assistant",
        "It is sunny.",
        "--text",
        "And tomorrow?",
        "--system",
        "Be brief.",
    ]
    assert cli.main([*argv, "--output", str(reply), *MODEL_ARGS, "--greedy", "--max-new-tokens", "8"]) == 0
    messages = [
        {"role": "user", "content": [{"type": "audio", "path": audio}]},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    ]
    inputs = processor.spoken_dialogue(messages, system_prompt="Be brief.")
    text, audio_out, patches = _generate(model, processor, inputs, "spoken_dialogue", max_new_tokens=8)
    text_line, speech_line = capsys.readouterr().out.removesuffix("\n").rsplit("\n", 1)
    assert text_line == text
    _check_speech_file(speech_line, reply, audio_out, patches, 4 * 960)


def test_reconstruct_all_quantizers_of_a_resampled_mp3(tmp_path, pipeline, capsys):
    """A 32 kHz mp3 is resampled by the feature extractor; all 12 quantizers are kept by default."""
    output = tmp_path / "weather.wav"
    assert (
        cli.main(
            [
                "reconstruct",
                str(AUDIO / "weather_today_zh.mp3"),
                "--output",
                str(output),
                "--audio-tokenizer",
                str(CODEC),
            ]
        )
        == 0
    )
    codec, feature_extractor = pipeline[1].audio_tokenizer, pipeline[1].feature_extractor
    waveform, rate = sf.read(AUDIO / "weather_today_zh.mp3", dtype="float32", always_2d=True)
    features = feature_extractor(torch.from_numpy(waveform.T.copy()), sampling_rate=rate)
    with torch.no_grad():
        codes = codec.encode(features["input_features"], features["input_features_mask"]).audio_codes
        expected = codec.decode(codes).audio_values[0, 0]
    assert codes.shape[1] == 12
    assert f"codes: (12, {codes.shape[-1]})" in capsys.readouterr().out
    np.testing.assert_allclose(sf.read(output, dtype="float32")[0], expected.numpy(), rtol=0, atol=1e-5)


def test_convert_forwards_to_the_conversion_scripts(tmp_path, pipeline, capsys):
    """`convert tokenizer` / `convert lm` run the two conversion scripts; a converted LM directory with its codec in
    `audio_tokenizer/` then serves `--model` alone and gives the same transcript as the original directories."""
    assert cli.main(["convert", "tokenizer", "--input_dir", str(CODEC), "--output_dir", str(tmp_path / "codec")]) == 0
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "codec").iterdir()
    }
    converted = tmp_path / "lm"
    argv = ["convert", "lm", "--input_dir", str(LM), "--tokenizer_dir", str(CODEC), "--output_dir", str(converted)]
    assert cli.main(argv) == 0
    assert (converted / "audio_tokenizer" / "config.json").is_file()
    capsys.readouterr()

    audio = str(AUDIO / "weather_today_zh.mp3")
    assert (
        cli.main(["asr", audio, "--model", str(converted), "--device", "cpu", "--greedy", "--max-new-tokens", "12"])
        == 0
    )
    model, processor = pipeline
    assert capsys.readouterr().out == _generate(model, processor, processor.asr(audio), "asr", 12)[0] + "\n"

    # refusing to overwrite and a script usage error: one line, exit 2
    assert cli.main(["convert", "tokenizer", "--input_dir", str(CODEC), "--output_dir", str(tmp_path / "codec")]) == 2
    assert (err := capsys.readouterr().err).startswith("error: --output_dir") and "is not empty; pass --force" in err
    assert cli.main(argv) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert cli.main(["convert", "lm", "--input_dir", str(LM)]) == 2
    assert "--output_dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bogus"], "invalid choice: 'bogus'"),
        ([], "the following arguments are required: COMMAND"),
        (["tts", "Hi", "--output", "no/such/folder/out.wav", *MODEL_ARGS], "the folder of the output file"),
        (["tts", "Hi", "--output", "out.mp4", *MODEL_ARGS], "must end in .wav, .flac or .ogg"),
        (["asr", str(AUDIO / "README.md"), *MODEL_ARGS], "as audio"),
        (["asr", str(AUDIO / "weather_today_zh.mp3"), "--model", str(AUDIO)], "not a checkpoint directory"),
        (["asr", str(AUDIO / "weather_today_zh.mp3"), "--model", "./nowhere/model"], "no such directory"),
        (["chat", *MODEL_ARGS], "give the user turn with --text and/or --audio"),
        (["chat", "--text", "Hi", "--assistant", "Hello", *MODEL_ARGS], "must end with a user turn"),
        (["chat", "--assistant", "Hello", "--text", "Hi", *MODEL_ARGS], "must follow the user turn"),
        (
            [
                "reconstruct",
                str(AUDIO / "prompt_speech_en_w.wav"),
                "--output",
                "x.wav",
                "--audio-tokenizer",
                str(CODEC),
                "--num-quantizers",
                "13",
            ],
            "between 1 and 12",
        ),
        (["asr", str(AUDIO / "weather_today_zh.mp3"), "--max-new-tokens", "0", *MODEL_ARGS], "must be positive"),
        (["tts", "Hi", "--output", "x.wav", "--load-in-4bit", "--load-in-8bit"], "not allowed with argument"),
        # a codec given as --model, an LM as --audio-tokenizer: refused before anything is built (a wrong config
        # would build the full-size default model)
        (["asr", str(AUDIO / "weather_today_zh.mp3"), "--model", str(CODEC)], "is not a MiMo-Audio language model"),
        (
            ["asr", str(AUDIO / "weather_today_zh.mp3"), "--model", str(LM), "--audio-tokenizer", str(LM)],
            "is not a MiMo-Audio audio tokenizer",
        ),
        (["asr", "x.wav", "--device", "banana", *MODEL_ARGS[:4]], "--device 'banana' is not a device"),
        (["asr", "x.wav", "--seed", "-1", *MODEL_ARGS], "--seed must be in [0, 2**32), got -1"),
        (["demo", "--seed", str(2**32)], "--seed must be in [0, 2**32)"),
        (
            ["convert", "lm", "--input_dir", "nowhere", "--output_dir", "out"],
            "--input_dir 'nowhere' is not a directory",
        ),
    ],
)
def test_usage_and_input_errors_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_usage_error(capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(cli, "load_model_and_processor", lambda args: loads.append(args))
    assert cli.main(["asr", str(AUDIO / "weather_today_zh.mp3"), *MODEL_ARGS[:4], "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'cuda': CUDA is not available on this machine" in err
    assert loads == []


def test_no_speech_generated_exits_1(tmp_path, pipeline, capsys):
    """TTS that stops before any audio patch: exit 1 with a clear message and no file. With seed 16 and one position
    the sampled first token of lm_a is text, not `<|empty|>` (checked first)."""
    model, processor = pipeline
    _, audio, patches = _generate(model, processor, processor.tts("Hello there"), "tts", max_new_tokens=1, seed=16)
    assert audio is None and patches == 0
    output = tmp_path / "none.wav"
    assert (
        cli.main(["tts", "Hello there", "--output", str(output), *MODEL_ARGS, "--seed", "16", "--max-new-tokens", "1"])
        == 1
    )
    assert "no speech was generated" in capsys.readouterr().err and not output.exists()


def test_commands_without_quantization_never_import_bitsandbytes(tmp_path):
    """Importing bitsandbytes prints a kernels-community warning on CPU: commands that do not quantize must not import
    it (nor peft, which imports it)."""
    code = (
        "import sys\n"
        "from transformers_mimo import cli\n"
        f"assert cli.main(['demo', '--max-new-tokens', '2', '--output', {str(tmp_path / 'demo.wav')!r}]) == 0\n"
        "print(sorted(name for name in ('bitsandbytes', 'peft') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "kernels-community" not in result.stderr
