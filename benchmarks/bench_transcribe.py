"""Peak memory and wall time of long-form transcription (`transformers_mimo.transcribe`) against recording length.

Builds a synthetic recording of N minutes from the speech clips of tests/fixtures/audio (clips separated by short
pauses, like continuous speech) and transcribes it with the tiny V2.5-style test checkpoint on CPU. Each length runs
in its own subprocess; peak memory is the growth of the process's peak resident set (VmHWM) during `transcribe`
over its resident set just before, with the recording already in memory, so it shows what the transcription
itself needs. The recording's own size (4 bytes per sample) is printed next to it.

    python benchmarks/bench_transcribe.py                         # 10 and 60 minutes, batch size 8
    python benchmarks/bench_transcribe.py --minutes 10 60 --batch-size 4 --threads 2

Linux only (reads /proc/self/status).
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "fixtures" / "golden"
AUDIO = REPO / "tests" / "fixtures" / "audio"
RATE = 24000


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) / 1024


def synthetic_recording(minutes: float) -> torch.Tensor:
    """Speech clips in turn with 0.5 s pauses, cut to `minutes` minutes, `(samples,)` at 24 kHz."""
    import soundfile as sf

    pause = torch.zeros(RATE // 2)
    clips = [
        torch.from_numpy(sf.read(AUDIO / name, dtype="float32")[0])
        for name in ("prompt_speech_en_w.wav", "prompt_speech_zh_m.wav")
    ]
    unit = torch.cat([clips[0], pause, clips[1], pause])
    samples = int(minutes * 60 * RATE)
    return unit.repeat(samples // unit.numel() + 1)[:samples]


def measure(minutes: float, batch_size: int, threads: int, max_new_tokens: int) -> dict:
    from transformers_mimo import MiMoAudioForConditionalGeneration, MiMoAudioProcessor, transcribe

    torch.set_num_threads(threads)
    checkpoint = GOLDEN / "v25_lm_a" / "checkpoint"
    processor = MiMoAudioProcessor.from_pretrained(checkpoint, audio_tokenizer=GOLDEN / "tok_a" / "checkpoint")
    model = MiMoAudioForConditionalGeneration.from_pretrained(checkpoint).eval()
    transcribe(model, processor, (synthetic_recording(0.5), RATE), max_new_tokens=2, vad="energy")  # warm up
    recording = synthetic_recording(minutes)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    result = transcribe(
        model,
        processor,
        (recording, RATE),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        vad="energy",
        instruction="Transcribe this voice recording",
    )
    wall = time.perf_counter() - start
    return {
        "minutes": minutes,
        "segments": len(result.segments),
        "longest_segment_s": max(segment.end - segment.start for segment in result.segments),
        "wall_s": wall,
        "peak_mb": _status_mb("VmHWM") - before,
        "recording_mb": recording.numel() * 4 / 2**20,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.batch_size, args.threads, args.max_new_tokens)))
        return
    print("| minutes | segments | longest segment s | wall s | peak memory of transcribe MB | recording MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for minutes in args.minutes:
        command = [
            sys.executable,
            __file__,
            "--child",
            str(minutes),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--max-new-tokens",
            str(args.max_new_tokens),
        ]
        row = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(
            f"| {row['minutes']:g} | {row['segments']} | {row['longest_segment_s']:.1f} | {row['wall_s']:.1f} | "
            f"{row['peak_mb']:.0f} | {row['recording_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
