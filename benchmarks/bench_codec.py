"""Wall time and peak memory of the MiMo-Audio tokenizer (codec): encode and decode, eager vs SDPA attention.

Runs a mid-size RANDOM configuration (the real model's structure and window sizes, fewer and narrower layers, see
`benchmark_config`) on synthetic audio of several lengths and prints a markdown table. No checkpoint is needed.

    python benchmarks/bench_codec.py                       # 10 s, 60 s, 600 s; eager and sdpa
    python benchmarks/bench_codec.py --seconds 10 60 --attn sdpa --threads 4

Each measurement runs in its own subprocess (so one running out of memory or time does not stop the others):
the process builds the model, warms up on 1 s of audio, then reports the best wall time of up to `--repeats` calls
(no new call starts after 20 s of calls). Peak memory is the growth of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before the call) over its resident set
at that moment, so it counts everything the call allocates, the output included. Linux only.
"""

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

import torch
import transformers


CODE_RATE = 25  # codes per second (hop 240 * stride 2 * avg_pooler 2 at 24 kHz)


def benchmark_config():
    """Mid-size random config: real structure (RoPE transformers, 20 RVQ levels, vocoder window [40, 10], 60 s
    encoder segments, full causal decoder), with 4 + 4 + 4 layers of width 320 / 320 / 128 instead of 32 + 32 + 16 of
    width 1280 / 1280 / 256."""
    from transformers_mimo import MiMoAudioTokenizerConfig

    return MiMoAudioTokenizerConfig(
        d_model=320,
        encoder_layers=4,
        encoder_attention_heads=5,
        encoder_ffn_dim=1280,
        encoder_skip_layer_id=3,
        decoder_layers=4,
        decoder_attention_heads=5,
        decoder_ffn_dim=1280,
        vocoder_dim=128,
        vocoder_intermediate_dim=512,
        vocoder_num_layers=4,
        vocoder_attention_heads=8,
    )


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1)) / 1024


def _synthetic_waveform(seconds: float, sampling_rate: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    time_axis = torch.arange(int(seconds * sampling_rate)) / sampling_rate
    tone = 0.2 * torch.sin(2 * torch.pi * (150.0 + 50.0 * torch.sin(0.5 * time_axis)) * time_axis)
    return tone + 0.02 * torch.randn(time_axis.shape, generator=generator)


def run_worker(op: str, seconds: float, attn: str, threads: int, max_memory_gb: float, repeats: int) -> dict:
    """Times `encode` or `decode` on `seconds` of audio (best of up to `repeats` calls); returns the measurements."""
    from transformers_mimo import MiMoAudioFeatureExtractor, MiMoAudioTokenizerModel

    torch.set_num_threads(threads)
    # Fail cleanly (allocation error) instead of being killed by the OOM killer.
    limit = int((_status_mb("VmSize") + max_memory_gb * 1024) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    torch.manual_seed(0)
    config = benchmark_config()
    config._attn_implementation = attn
    model = MiMoAudioTokenizerModel(config).eval()
    feature_extractor = MiMoAudioFeatureExtractor(n_mels=config.n_mels, sampling_rate=config.sampling_rate)
    result = {"op": op, "seconds": seconds, "attn": attn}

    def prepare(length_seconds):
        if op == "encode":
            waveform = _synthetic_waveform(length_seconds, config.sampling_rate)
            start = time.perf_counter()
            features = feature_extractor(waveform, sampling_rate=config.sampling_rate, return_tensors="pt")
            return (features["input_features"], features["input_features_mask"]), time.perf_counter() - start
        generator = torch.Generator().manual_seed(0)
        codes = torch.stack(
            [
                torch.randint(0, size, (int(length_seconds * CODE_RATE),), generator=generator)
                for size in config.codebook_size[:8]
            ]
        )
        return (codes[None],), 0.0

    def call(inputs):
        return model.encode(*inputs) if op == "encode" else model.decode(*inputs)

    call(prepare(1.0)[0])  # warm-up
    inputs, result["features_s"] = prepare(seconds)
    times, peaks = [], []
    while len(times) < repeats and sum(times) < 20.0:  # best of `repeats` calls, fewer for long calls
        output = None
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current resident set
        baseline = _status_mb("VmRSS")
        start = time.perf_counter()
        output = call(inputs)
        times.append(time.perf_counter() - start)
        peaks.append(_status_mb("VmHWM") - baseline)
    result.update(time_s=min(times), peak_mb=max(peaks), calls=len(times))
    result["output_shape"] = list((output.audio_codes if op == "encode" else output.audio_values).shape)
    return result


def measure(op, seconds, attn, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        op,
        "--seconds",
        str(seconds),
        "--attn",
        attn,
        "--threads",
        str(args.threads),
        "--max_memory_gb",
        str(args.max_memory_gb),
        "--repeats",
        str(args.repeats),
    ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"> {args.timeout} s"}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        memory = "can't allocate" in completed.stderr or "MemoryError" in completed.stderr
        return {"error": f"out of memory (> {args.max_memory_gb:g} GB)" if memory else f"failed: {tail[0][:80]}"}
    return json.loads(lines[-1])


def machine_info(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = re.search(r"model name\s*:\s*(.+)", cpuinfo.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs ({threads} torch threads), {memory_gb:.0f} GiB RAM; "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )


def format_table(rows: list[dict]) -> str:
    lines = [
        "| audio | attention | features (s) | encode (s) | encode peak (MB) | decode (s) | decode peak (MB) "
        "| decode MB per audio-second |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(result, key, fmt):
        return result["error"] if "error" in result else format(result[key], fmt)

    for row in rows:
        encode, decode = row["encode"], row["decode"]
        per_second = "" if "error" in decode else f"{decode['peak_mb'] / row['seconds']:.2f}"
        lines.append(
            f"| {row['seconds']:g} s | {row['attn']} | {cell(encode, 'features_s', '.2f')} "
            f"| {cell(encode, 'time_s', '.2f')} | {cell(encode, 'peak_mb', '.0f')} | {cell(decode, 'time_s', '.2f')} "
            f"| {cell(decode, 'peak_mb', '.0f')} | {per_second} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 60, 600], help="audio lengths")
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many calls (fewer past 20 s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per measurement")
    parser.add_argument("--max_memory_gb", type=float, default=8, help="memory allowed per measurement")
    parser.add_argument("--worker", choices=["encode", "decode"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = run_worker(args.worker, args.seconds[0], args.attn[0], args.threads, args.max_memory_gb, args.repeats)
        print(json.dumps(result))
        return

    rows = []
    for seconds in args.seconds:
        for attn in args.attn:
            row = {"seconds": seconds, "attn": attn}
            for op in ("encode", "decode"):
                row[op] = measure(op, seconds, attn, args)
                print(f"{op:6s} {seconds:6g} s {attn:5s}: {row[op]}", file=sys.stderr, flush=True)
            rows.append(row)
    command = "python benchmarks/bench_codec.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Machine: {machine_info(args.threads)}\n\nCommand: `{command.strip()}`\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
