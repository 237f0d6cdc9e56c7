"""Long-form ASR (`transcribe`, `find_speech_segments`), the `mimo-audio asr` command and benchmarks/eval_asr.py, on
the tiny V2.5-style and MiMo-Audio golden checkpoints with real speech clips and synthetic recordings."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AUDIO, GOLDEN

from transformers_mimo import (
    MiMoAudioForConditionalGeneration,
    MiMoAudioProcessor,
    find_speech_segments,
    transcribe,
)
from transformers_mimo.transcription_mimo_audio import join_segment_texts


RATE = 24000
V25 = GOLDEN / "v25_lm_a" / "checkpoint"
CODEC = GOLDEN / "tok_a" / "checkpoint"
INSTRUCTION = "Transcribe this voice recording"


@pytest.fixture(scope="module")
def speech():
    clips = [
        sf.read(AUDIO / name, dtype="float32")[0] for name in ("prompt_speech_en_w.wav", "prompt_speech_zh_m.wav")
    ]
    return [torch.from_numpy(clip) for clip in clips]


@pytest.fixture(scope="module")
def v25():
    processor = MiMoAudioProcessor.from_pretrained(V25, audio_tokenizer=CODEC)
    model = MiMoAudioForConditionalGeneration.from_pretrained(V25).eval()
    return model, processor


def _silence(seconds):
    return torch.zeros(round(seconds * RATE))


def _inside(time, intervals):
    return any(start <= time <= end for start, end in intervals)


@pytest.mark.parametrize("vad", ["silero", "energy"])
def test_segments_end_in_pauses(speech, vad):
    """Clips separated by pauses: every segment boundary lies in a pause, every clip lies in one segment, leading and
    trailing silence is left out; with a 6 s limit the 3.3 s + 4.5 s clips cannot share a segment."""
    en, zh = speech
    parts = [_silence(1.0), en, _silence(2.0), zh, _silence(0.6), en, _silence(3.0)]
    waveform = torch.cat(parts)
    edges = np.cumsum([0] + [part.numel() / RATE for part in parts])
    pauses = [(edges[i], edges[i + 1]) for i in (0, 2, 4, 6)]
    clips = [(edges[i], edges[i + 1]) for i in (1, 3, 5)]
    segments = find_speech_segments(waveform, RATE, max_segment_seconds=6, vad=vad)
    assert len(segments) == 3
    for start, end in segments:
        assert _inside(start, pauses) and _inside(end, pauses) and end - start <= 6
    for clip_start, clip_end in clips:  # each clip, give or take the quiet first/last 100 ms of its file
        assert any(start <= clip_start + 0.1 and clip_end - 0.1 <= end for start, end in segments)
    assert segments[0][0] > 0.5 and segments[-1][1] < edges[-1] - 2.0


def test_speech_without_pauses_is_cut_at_the_quietest_point_near_the_limit(speech):
    en, zh = speech
    waveform = torch.cat([en, zh] * 6)  # 47 s of speech, no pause of 0.3 s
    segments = find_speech_segments(waveform, RATE, max_segment_seconds=20, vad="energy")
    assert len(segments) == 3
    for (_, end), (start, _) in zip(segments, segments[1:]):
        assert end == start  # contiguous: nothing lost at a forced cut
    for start, end in segments:
        assert end - start <= 20
    frame = RATE // 100
    energy = waveform[: waveform.numel() // frame * frame].reshape(-1, frame).square().mean(-1)
    first_cut = round(segments[0][1] * 100)
    limit = 2000 - 2 * 20  # 20 s minus the two 0.2 s margins, in 10 ms frames
    window = energy[round(segments[0][0] * 100) + 3 * limit // 4 : round(segments[0][0] * 100) + limit]
    assert energy[first_cut] == window.min()


def test_timestamps_do_not_drift_at_other_rates():
    """At 22050 Hz a 10 ms frame is 220.5 samples: times are counted in whole frames of their true length."""
    rate = 22050
    recording = torch.zeros(1800 * rate)
    tone = 0.3 * torch.sin(torch.arange(2 * rate) * 2 * torch.pi * 220 / rate)
    recording[1790 * rate : 1792 * rate] = tone
    ((start, end),) = find_speech_segments(recording, rate, vad="energy")
    assert start == pytest.approx(1790 - 0.2, abs=0.02) and end == pytest.approx(1792 + 0.2, abs=0.02)


def test_silence_and_bad_input(tmp_path, v25):
    model, processor = v25
    for waveform in (_silence(5), 1e-4 * torch.randn(5 * RATE)):
        result = transcribe(model, processor, (waveform, RATE), vad="energy")
        assert result.text == "" and result.segments == [] and result.duration == 5.0
    with pytest.raises(ValueError, match="empty"):
        transcribe(model, processor, (torch.zeros(0), RATE))
    with pytest.raises(ValueError, match="`language` must be"):
        transcribe(model, processor, (_silence(1), RATE), language="de")
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        transcribe(model, processor, (_silence(1), RATE), batch_size=0)
    with pytest.raises(ValueError, match="`vad` must be one of"):
        transcribe(model, processor, (_silence(1), RATE), vad="webrtc")
    one = tmp_path / "one.wav"  # a 1-sample file: no speech region of 0.1 s, so nothing to transcribe
    sf.write(one, np.array([0.5], dtype=np.float32), RATE)
    assert transcribe(model, processor, str(one)).segments == []
    with pytest.raises(ValueError, match="NaN or infinite"):
        transcribe(model, processor, (torch.tensor([0.0, float("nan")] * 100), RATE))
    with pytest.raises(ValueError, match="sampling rate must be a positive int"):
        transcribe(model, processor, (_silence(1), 24000.0))
    with pytest.raises(ValueError, match="no audio file"):
        transcribe(model, processor, "/nonexistent.wav")


def test_an_hour_in_batches_equals_each_segment_alone(v25, speech):
    """One hour of synthetic audio (silence with six spoken clips): six segments at the right times, transcribed two
    per batch, each exactly what `processor.asr` + greedy `generate` give the segment alone; a clip shorter than
    the limit is transcribed whole."""
    model, processor = v25
    en, zh = speech
    hour = torch.zeros(3600 * RATE)
    starts = [100 + 600 * k for k in range(6)]
    for k, start in enumerate(starts):
        clip = en if k % 2 == 0 else zh
        hour[start * RATE : start * RATE + clip.numel()] = clip
    greedy = {"do_sample": False, "audio_do_sample": False}
    result = transcribe(
        model,
        processor,
        (hour, RATE),
        language="en",
        instruction=INSTRUCTION,
        batch_size=2,
        max_new_tokens=5,
        vad="energy",
        generation_kwargs=greedy,
    )
    assert result.duration == 3600.0 and len(result.segments) == 6
    for segment, start in zip(result.segments, starts):
        assert start - 0.3 < segment.start < start + 0.2 and segment.end - segment.start < 5.0
        inputs = processor.asr(
            (hour[round(segment.start * RATE) : round(segment.end * RATE)], RATE),
            language="en",
            instruction=INSTRUCTION,
        )
        output = model.generate(**inputs, **{**processor.generation_kwargs("asr"), **greedy}, max_new_tokens=5)
        expected = processor.batch_decode_generation(
            output, prompt_length=inputs["input_ids"].shape[1], decode_audio=False
        )
        assert segment.text == expected.text[0]
    assert result.text == join_segment_texts([segment.text for segment in result.segments])

    short = transcribe(
        model, processor, (torch.cat([_silence(0.5), en]), RATE), instruction=INSTRUCTION, max_new_tokens=2
    )
    assert [(s.start, s.end) for s in short.segments] == [(0.0, pytest.approx(0.5 + en.numel() / RATE))]


def test_mimo_audio_checkpoint_uses_its_own_prompt(speech):
    processor = MiMoAudioProcessor.from_pretrained(GOLDEN / "lm_a" / "checkpoint", audio_tokenizer=CODEC)
    model = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_a" / "checkpoint").eval()
    en, _ = speech
    result = transcribe(model, processor, [(en, RATE), str(AUDIO / "weather_today_zh.mp3")], max_new_tokens=3)
    inputs = processor.asr(str(AUDIO / "weather_today_zh.mp3"))
    output = model.generate(**inputs, **processor.generation_kwargs("asr"), max_new_tokens=3)
    assert (
        result[1].text == processor.batch_decode_generation(output, prompt_length=inputs["input_ids"].shape[1]).text[0]
    )
    with pytest.raises(ValueError, match="needs a MiMo-V2.5-ASR checkpoint"):
        transcribe(model, processor, (en, RATE), language="zh")


def test_join_segment_texts():
    assert (
        join_segment_texts(["Hello there.", " How are you? ", "", "今天", "天气好", "OK"])
        == "Hello there. How are you?今天天气好OK"
    )


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_asr_formats_and_files(tmp_path, capsys, speech):
    from transformers_mimo import cli

    en, zh = speech
    long_file = tmp_path / "talk.wav"
    sf.write(long_file, torch.cat([_silence(0.5), en, _silence(1.0), zh, _silence(1.0), en]).numpy(), RATE)
    model_args = [
        "--model",
        str(V25),
        "--audio-tokenizer",
        str(CODEC),
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
        "--greedy",
        "--seed",
        "0",
    ]
    files = [str(long_file), str(AUDIO / "weather_today_zh.mp3")]
    argv = ["asr", *files, *model_args, "--max-segment-seconds", "6", "--batch-size", "2", "--language", "en"]

    assert cli.main([*argv, "--output-format", "json", "--timestamps"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["file"] for record in records] == files
    assert [len(record["segments"]) for record in records] == [3, 1]
    assert records[0]["text"] == join_segment_texts([segment["text"] for segment in records[0]["segments"]])

    assert cli.main([*argv, "--output-dir", str(tmp_path), "--output-format", "srt"]) == 0
    srt = (tmp_path / "talk.srt").read_text()
    first = records[0]["segments"][0]
    assert srt.startswith(f"1\n00:00:00,{round(first['start'] * 1000):03d} --> ") and "\n3\n" in srt
    capsys.readouterr()
    # never overwrites: exit 2, one line, and the file is unchanged
    assert cli.main([*argv, "--output-dir", str(tmp_path), "--output-format", "srt"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exists" in error and (tmp_path / "talk.srt").read_text() == srt

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), RATE)
    for bad, message in (
        (
            ["asr", files[0], "--model", str(GOLDEN / "lm_a" / "checkpoint"), "--language", "zh"],
            "needs a MiMo-V2.5-ASR",
        ),
        (["asr", files[0], *model_args, "--batch-size", "0"], "--batch-size must be positive"),
        (["asr", *files, *model_args, "--output-format", "srt"], "needs --output-dir"),
        (["asr", str(tmp_path / "missing.wav"), *model_args], "does not exist"),
        (["asr", str(empty), *model_args], "holds no samples"),
    ):
        assert cli.main(bad) == 2, bad
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error and "Traceback" not in error
    assert cli.main(["asr", files[0], *model_args, "--language", "fr"]) == 2  # argparse choices


# ------------------------------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def eval_asr():
    path = Path(__file__).parents[1] / "benchmarks" / "eval_asr.py"
    spec = importlib.util.spec_from_file_location("eval_asr", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_rates_and_normalization(eval_asr):
    assert eval_asr.normalize_english("Hello,  WORLD! It's  'fine'.") == "hello world it's fine"
    assert eval_asr.normalize_chinese("今天 天气，如何？ＡＢ") == "今天天气如何ab"
    assert eval_asr.error_rate(["Hello world, again!"], ["hello word again"], "wer") == pytest.approx(1 / 3)
    assert eval_asr.error_rate(["今天天气如何？"], ["今天天汽如何"], "cer") == pytest.approx(1 / 6)
    assert (
        eval_asr.pick_metric(["hello", "今天"], "auto") == "cer" and eval_asr.pick_metric(["hello"], "auto") == "wer"
    )


def test_eval_asr_runs_on_a_folder_and_a_dataset(tmp_path, eval_asr, capsys):
    """Mechanics on the tiny model (random weights, random text): the printed table, the hypotheses file (equal to
    `transcribe` on the same files) and the error rate recomputed from it."""
    import datasets

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in (("prompt_speech_en_w.wav", "Hello there"), ("weather_today_zh.mp3", "今天天气如何？")):
        (folder / name).write_bytes((AUDIO / name).read_bytes())
        (folder / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    common = [
        "--model",
        str(V25),
        "--audio-tokenizer",
        str(CODEC),
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]
    summary = eval_asr.main(["--data", str(folder), *common, "--hypotheses", str(tmp_path / "hyp.jsonl")])
    lines = [json.loads(line) for line in (tmp_path / "hyp.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["id"] for line in lines] == ["prompt_speech_en_w", "weather_today_zh"]
    assert summary["metric"] == "cer" and summary["utterances"] == 2
    expected = eval_asr.error_rate([l["reference"] for l in lines], [l["hypothesis"] for l in lines], "cer")
    assert summary["error_rate"] == expected and summary["throughput"] > 0
    assert summary["audio_seconds"] == pytest.approx(
        sum(sf.info(folder / n).duration for n in ("prompt_speech_en_w.wav", "weather_today_zh.mp3")), abs=0.05
    )
    assert f"| 2 | {summary['audio_seconds']:.1f} |" in capsys.readouterr().out

    dataset = datasets.Dataset.from_dict({"audio": [str(folder / "prompt_speech_en_w.wav")], "text": ["Hello there"]})
    dataset.cast_column("audio", datasets.Audio(decode=False)).save_to_disk(str(tmp_path / "ds"))
    summary = eval_asr.main(["--dataset", str(tmp_path / "ds"), *common, "--metric", "wer"])
    assert summary["metric"] == "wer" and summary["utterances"] == 1 and 0 <= summary["error_rate"]


def test_bench_transcribe_measures_a_short_recording():
    path = Path(__file__).parents[1] / "benchmarks" / "bench_transcribe.py"
    spec = importlib.util.spec_from_file_location("bench_transcribe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recording = module.synthetic_recording(0.5)
    assert recording.shape == (30 * RATE,) and recording.abs().max() > 0.1
    row = module.measure(0.75, batch_size=2, threads=2, max_new_tokens=2)
    assert row["segments"] == 2 and row["longest_segment_s"] <= 30 and row["wall_s"] > 0 and row["peak_mb"] >= 0
