"""Speed and memory of MiMo-Audio's patch-level `generate()` on random weights, eager and `compile=True`.

Every step is forced to choose audio (a logits processor that only allows `<|empty|>`), so each step produces one
patch of `group_size` x `audio_channels` codes per sample: an LLM decode step plus the patch decoder's
`group_size + max(delay_pattern)` steps. Modes: **eager** (the defaults: dynamic LLM cache) and **compiled**
(`generate(..., compile=True)`: static caches, the decode step and the whole patch compiled by `torch.compile`; on
CUDA in CUDA graphs). The first call of each batch size (compilation included) is reported on its own.

Parts (printed as Markdown tables):

1. `throughput`: mid-size config, patches/s per batch size (CPU: 1, 4, 8; CUDA: 1, 8, 32), prefill and decode step
   times, and whether the codes equal eager's.
2. `memory`: mid-size config, batch 8, a 2,000-position generation (`--memory-positions`, half prompt, half new):
   peak memory of `generate` over what the process held before (CPU: peak resident set, `VmHWM`; CUDA: peak
   allocated), and the growth from the 100th step to the last one (none is expected beyond the preallocated caches).
3. `real` (CUDA only): the released widths (`MiMoAudioConfig()`, 8.0B parameters, bf16), batch 1, 8 and 32:
   patches/s and the real-time factor (decode step time / 0.16 s of audio per patch) at batch 1.

    python benchmarks/bench_generate.py                      # all parts the device allows
    python benchmarks/bench_generate.py --part throughput    # one part
    python benchmarks/bench_generate.py --device cuda        # on a GPU (compiled = CUDA graphs)
"""

import argparse
import os
import platform
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from transformers_mimo.configuration_mimo_audio import MiMoAudioConfig
from transformers_mimo.generation_mimo_audio import MiMoAudioStreamer
from transformers_mimo.modeling_mimo_audio import MiMoAudioForConditionalGeneration


MODES = {"eager": {}, "compiled": {"compile": True, "cache_implementation": "static"}}
MID_SIZE = {
    "text": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
    "encoder": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8},
    "decoder": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8},
    "vocab_size": 8192,
}


class ChooseAudio(LogitsProcessor):
    """Makes `<|empty|>` the only allowed text token, so every step generates an audio patch."""

    def __init__(self, empty_token_id: int):
        self.empty_token_id = empty_token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.empty_token_id] = 0.0
        return forced


def build_model(text: dict, encoder: dict, decoder: dict, vocab_size: int, dtype=torch.float32, device="cpu"):
    """A random model: `text` overrides the Qwen2 backbone config, `encoder` / `decoder` the patch transformers
    (no GQA, head dim `width // heads`, as released)."""
    torch.manual_seed(0)
    patch = {name: {**sizes, "num_key_value_heads": sizes["num_attention_heads"]} for name, sizes in
             (("encoder", encoder), ("decoder", decoder))}  # fmt: skip
    for sizes in patch.values():
        sizes["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]
    config = MiMoAudioConfig(
        text_config={"model_type": "qwen2", "vocab_size": vocab_size, "rope_theta": 640000.0, **text},
        patch_encoder_config=patch["encoder"],
        patch_decoder_config=patch["decoder"],
        empty_token_id=vocab_size - 1,
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = MiMoAudioForConditionalGeneration(config)
    return model.to(dtype).eval()


def mid_size_model(dtype=torch.float32, device="cpu"):
    return build_model(**MID_SIZE, dtype=dtype, device=device)


def random_prompt(model, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating text positions and audio positions (random codes), on the model's device."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.empty_token_id, (batch_size, length), generator=generator)
    input_ids[:, 1::2] = config.empty_token_id
    sizes = torch.tensor(config.audio_empty_ids)  # codes below each empty id
    audio = (
        torch.rand(batch_size, length, config.group_size, config.audio_channels, generator=generator) * sizes
    ).long()
    audio[input_ids != config.empty_token_id] = sizes
    return input_ids.to(model.device), audio.to(model.device)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forced_audio_generate(model, prompt, steps: int, mode: str, **kwargs):
    """`generate` of `steps` all-audio positions; returns the new codes `(batch, steps, group_size, channels)`."""
    input_ids, audio = prompt
    out = model.generate(
        input_ids,
        audio,
        max_new_tokens=steps,
        eos_token_id=None,
        logits_processor=LogitsProcessorList([ChooseAudio(model.config.empty_token_id)]),
        return_dict_in_generate=True,  # a model built from a config returns the text tensor by default
        **MODES[mode],
        **kwargs,
    )
    assert out.sequences.shape[1] == input_ids.shape[1] + steps
    return out.audio_sequences[:, input_ids.shape[1] :]


@torch.no_grad()
def throughput(model, batch_sizes, prompt_length: int, new_tokens: int, repeats: int, mode: str) -> dict:
    """
    For each batch size: `(first call seconds, prefill seconds, decode seconds per step, patches per second, codes)`.

    The first call (compilation included, for `compiled`) generates 2 positions. A decode step is the time between the
    first and the last of `new_tokens + 1` generated positions (stamped by a streamer as each is handed out) over
    `new_tokens`; each time the fastest of `repeats` runs that go through every batch size in turn, so that a slow
    phase of a shared machine reaches all alike.
    """
    prompts = {batch_size: random_prompt(model, batch_size, prompt_length) for batch_size in batch_sizes}
    device = model.device

    def timed(fn):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    first = {b: timed(lambda: forced_audio_generate(model, prompts[b], 2, mode)) for b in batch_sizes}
    runs = {(batch_size, kind): [] for batch_size in batch_sizes for kind in ("prefill", "step")}
    for _ in range(repeats):
        for b in batch_sizes:
            runs[b, "prefill"].append(timed(lambda: model(*prompts[b], use_cache=True, logits_to_keep=1)))
            stamps = StepTimes()
            forced_audio_generate(model, prompts[b], new_tokens + 1, mode, streamer=stamps)
            runs[b, "step"].append((stamps.times[-1] - stamps.times[0]) / new_tokens)
    results = {}
    for b in batch_sizes:
        per_step = min(runs[b, "step"])
        codes = forced_audio_generate(model, prompts[b], new_tokens + 1, mode)
        results[b] = (first[b], min(runs[b, "prefill"]), per_step, b / per_step, codes)
    return results


def part_throughput(args, device):
    parameters = sum(p.numel() for p in mid_size_model().parameters()) / 1e6
    print(
        f"\n### Throughput, mid-size config ({parameters:.0f}M parameters: LLM 512 wide x 8 layers, patch decoder "
        f"256 wide x 4 layers), prompt {args.prompt_length} positions, {args.new_tokens} timed steps\n"
    )
    print("| dtype | mode | batch | first call (s) | prefill (ms) | decode step (ms) | patches/s | codes as eager |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        reference = {}
        for mode in args.modes:
            model = mid_size_model(getattr(torch, dtype), device)
            results = throughput(model, args.batch_sizes, args.prompt_length, args.new_tokens, args.repeats, mode)
            for batch_size, (first, prefill, per_step, rate, codes) in results.items():
                same = (codes == reference.setdefault(batch_size, codes)).float().mean().item()
                print(
                    f"| {dtype} | {mode} | {batch_size} | {first:.1f} | {prefill * 1e3:.1f} | {per_step * 1e3:.1f} | "
                    f"{rate:.1f} | {same:.0%} |",
                    flush=True,
                )
            torch._dynamo.reset()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_resident():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class StepTimes(MiMoAudioStreamer):
    """Records the time at which each generated step is handed out (its ids are on the CPU by then)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_step(self, text_ids, audio_ids):
        self.times.append(time.perf_counter())


class MemoryTrace(MiMoAudioStreamer):
    """Records the memory in use after every generated step (CPU: resident set; CUDA: allocated)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.samples = []

    def on_step(self, text_ids, audio_ids):
        in_use = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else _resident_bytes()
        self.samples.append(in_use)


@torch.no_grad()
def generation_memory(model, batch_size: int, positions: int, mode: str) -> tuple[int, int, int]:
    """
    Memory of one all-audio `generate` of `positions` positions (half prompt, half new), after a warm-up call.

    Returns `(peak bytes over the memory in use before the call, bytes in use after step 100 minus after the first,
    bytes in use at the last step minus after step 100)`.
    """
    prompt_length = positions // 2
    prompt = random_prompt(model, batch_size, prompt_length)
    forced_audio_generate(model, prompt, positions - prompt_length, mode)  # warm-up, compilation
    trace = MemoryTrace(model.device)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _resident_bytes()
        _reset_peak_resident()
    forced_audio_generate(model, prompt, positions - prompt_length, mode, streamer=trace)
    peak = torch.cuda.max_memory_allocated() if model.device.type == "cuda" else _peak_resident_bytes()
    samples = trace.samples
    return peak - before, samples[100] - samples[0], samples[-1] - samples[100]


def part_memory(args, device):
    print(
        f"\n### Memory, mid-size config, batch {args.memory_batch_size}, {args.memory_positions} positions "
        f"({args.memory_positions // 2} prompt + {args.memory_positions - args.memory_positions // 2} generated)\n"
    )
    print("| dtype | mode | peak over before (MiB) | growth, steps 1 to 100 (MiB) | growth, step 100 to last (MiB) |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        for mode in args.modes:
            model = mid_size_model(getattr(torch, dtype), device)
            peak, early, late = generation_memory(model, args.memory_batch_size, args.memory_positions, mode)
            mib = 2**20
            print(f"| {dtype} | {mode} | {peak / mib:.1f} | {early / mib:.1f} | {late / mib:.1f} |", flush=True)
            torch._dynamo.reset()


def part_real_width(args, device):
    if device.type != "cuda":
        print("\n### Released widths: skipped (CUDA only: 8.0B parameters)")
        return
    model = build_model(
        text={"tie_word_embeddings": False},
        encoder={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 6, "num_attention_heads": 64},
        decoder={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 64},
        vocab_size=151680,
        dtype=torch.bfloat16,
        device=device,
    )
    config = model.config
    seconds_per_patch = config.group_size / 25.0  # 25 code frames per second of audio
    parameters = sum(p.numel() for p in model.parameters()) / 1e9
    print(
        f"\n### Released widths ({parameters:.1f}B parameters, random weights, bf16), "
        f"{torch.cuda.get_device_name(device)}, prompt {args.prompt_length} positions\n"
    )
    print("| mode | batch | first call (s) | decode step (ms) | patches/s | real-time factor per stream |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        results = throughput(model, args.real_batch_sizes, args.prompt_length, args.new_tokens, args.repeats, mode)
        for batch_size, (first, _, per_step, rate, _) in results.items():
            print(
                f"| {mode} | {batch_size} | {first:.1f} | {per_step * 1e3:.1f} | {rate:.1f} | "
                f"{per_step / seconds_per_patch:.3f} |",
                flush=True,
            )
        torch._dynamo.reset()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=["all", "throughput", "memory", "real"], default="all")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="dtypes of the mid-size parts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 4 8 on CPU, 1 8 32 on CUDA")
    parser.add_argument("--real-batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt length in LLM positions")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per generate call")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the fastest of this many runs")
    parser.add_argument("--memory-batch-size", type=int, default=8)
    parser.add_argument("--memory-positions", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    # Each batch size is its own static-shape graph: more variants than Dynamo's default limit of 8 in one process.
    torch._dynamo.config.recompile_limit = 64
    if args.batch_sizes is None:
        args.batch_sizes = [1, 8, 32] if device.type == "cuda" else [1, 4, 8]
    print(
        f"torch {torch.__version__}, {platform.machine()} ({cpu_name()}), "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    if args.part in ("all", "throughput"):
        part_throughput(args, device)
    if args.part in ("all", "memory"):
        part_memory(args, device)
    if args.part in ("all", "real"):
        part_real_width(args, device)


if __name__ == "__main__":
    main()
