"""Speed of MiMo-Audio's patch-level `generate()` on random weights (CPU by default).

Three parts, printed as Markdown tables, each in float32 and bfloat16 (the released checkpoints' dtype), eager and
compiled ("compiled, frozen weights": `torch.compile` of the LLM, patch encoder, patch decoder and text head with
Inductor's `freezing`, which turns the weights into constants prepacked for oneDNN/MKL; see `compile_frozen`):

1. Throughput on a mid-size config: audio patches per second at batch 1, 4 and 8 (every step is forced to choose
   audio, so every step yields one patch per sample), with the LLM's dynamic cache, with its static cache, and
   compiled (static cache). Prefill is timed separately (one forward over the prompt). The last column compares the
   generated codes with the first eager mode's.
2. Cost of the patch decoder relative to one LLM step at batch 1, on a config with the released model's layer
   counts and width ratios (36 LLM layers, 16 patch decoder layers, patch decoder 1/4 of the LLM width, 64-wide
   heads ratio kept) with every width divided by `--scale`, fp32.
3. The same comparison at the released widths: one real-width LLM layer timed against a KV cache of `--context`
   positions and extrapolated to 36 layers plus the real text head; the real-width patch decoder (16 layers) timed
   as `generate` runs it (see `part_real_width`). About 3.5 GB of memory (7 GB while compiled in float32).

    python benchmarks/bench_generate.py              # all parts, about 15 minutes on 2 CPU cores
    python benchmarks/bench_generate.py --no-compile # eager only (each compiled model compiles for ~1 min)
    python benchmarks/bench_generate.py --part real  # only part 3
"""

import argparse
import platform
import time

import torch
import torch._inductor.config
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList

from transformers_mimo.configuration_mimo_audio import MiMoAudioConfig
from transformers_mimo.modeling_mimo_audio import MiMoAudioForConditionalGeneration


AUDIO_VOCAB_SIZES = [1025, 1025] + [129] * 6
CLOCK = "cpu"


class ChooseAudio(LogitsProcessor):
    """Makes `<|empty|>` the only allowed text token, so every step generates an audio patch."""

    def __init__(self, empty_token_id: int):
        self.empty_token_id = empty_token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.empty_token_id] = 0.0
        return forced


def patch_config(width: int, ffn: int, layers: int, heads: int) -> dict:
    """A patch encoder/decoder config: no GQA, head dim `width // heads` (as in the released model)."""
    return {
        "hidden_size": width,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": width // heads,
    }


def build_model(text: dict, encoder: dict, decoder: dict, vocab_size: int) -> MiMoAudioForConditionalGeneration:
    torch.manual_seed(0)
    config = MiMoAudioConfig(
        text_config={"model_type": "qwen2", "vocab_size": vocab_size, "rope_theta": 640000.0, **text},
        patch_encoder_config=encoder,
        patch_decoder_config=decoder,
        audio_vocab_sizes=AUDIO_VOCAB_SIZES,
        empty_token_id=vocab_size - 1,
    )
    config._attn_implementation = "sdpa"
    return MiMoAudioForConditionalGeneration(config).eval()


def greedy_generation_config(model):
    """Greedy text and audio config with every MiMo-Audio default filled in, as `generate` prepares it."""
    generation_config, _ = model._prepare_generation_config(GenerationConfig(do_sample=False))
    return generation_config


def compile_frozen(*modules: torch.nn.Module):
    """
    `torch.compile`s each module's `forward` with Inductor's weight freezing, PyTorch's setting for CPU inference: the
    weights become constants of the compiled code, prepacked for oneDNN/MKL matrix products. Inference only (later
    changes to the weights are not seen). Compiling `forward` rather than the module keeps forward hooks outside the
    compiled code.
    """
    torch._inductor.config.freezing = True
    # One process compiles every batch size, each for the prefill of `generate`, its decode steps and the prefill timed
    # on its own: more variants than Dynamo's default limit of 8, past which it only warns and runs eagerly.
    torch._dynamo.config.recompile_limit = 64
    for module in modules:
        module.forward = torch.compile(module.forward)


def random_prompt(model, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating text positions and audio positions (random codes)."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.empty_token_id, (batch_size, length), generator=generator)
    input_ids[:, 1::2] = config.empty_token_id
    sizes = torch.tensor(config.audio_empty_ids)  # codes below each empty id
    audio = (
        torch.rand(batch_size, length, config.group_size, config.audio_channels, generator=generator) * sizes
    ).long()
    audio[input_ids != config.empty_token_id] = sizes
    return input_ids, audio


def clock() -> float:
    """Process CPU time (with --clock cpu) or wall time, in seconds."""
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` calls by `clock()`: on a shared machine other jobs only ever add time."""
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


@torch.no_grad()
def throughput(model, batch_sizes, prompt_length: int, new_tokens: int, repeats: int, **generate_kwargs) -> dict:
    """
    For each batch size: (prefill seconds, decode seconds per step, patches per second, generated audio codes).

    A decode step is `(time of new_tokens + 1 steps - time of 1 step) / new_tokens`. Each of the `repeats` runs times
    every batch size one after the other (prefill, 1 step, `new_tokens + 1` steps), and each time is the fastest over
    the runs, so that a slow phase of a shared machine (other jobs using the memory bandwidth) reaches all alike.
    """
    choose_audio = LogitsProcessorList([ChooseAudio(model.config.empty_token_id)])
    prompts = {batch_size: random_prompt(model, batch_size, prompt_length) for batch_size in batch_sizes}

    def generate(batch_size, steps):
        input_ids, audio = prompts[batch_size]
        out = model.generate(
            input_ids, audio, max_new_tokens=steps, eos_token_id=None, logits_processor=choose_audio, **generate_kwargs
        )
        assert out.sequences.shape[1] == prompt_length + steps
        return out.audio_sequences[:, prompt_length:]

    def prefill(batch_size):
        model(*prompts[batch_size], use_cache=True, logits_to_keep=1)

    for batch_size in batch_sizes:  # warm-up (and compilation)
        generate(batch_size, 2)
        prefill(batch_size)
    runs = {(batch_size, kind): [] for batch_size in batch_sizes for kind in ("prefill", "short", "long")}
    for _ in range(repeats):
        for batch_size in batch_sizes:
            for kind, fn in (
                ("prefill", lambda: prefill(batch_size)),
                ("short", lambda: generate(batch_size, 1)),
                ("long", lambda: generate(batch_size, new_tokens + 1)),
            ):
                start = clock()
                fn()
                runs[batch_size, kind].append(clock() - start)
    results = {}
    for batch_size in batch_sizes:
        per_step = (min(runs[batch_size, "long"]) - min(runs[batch_size, "short"])) / new_tokens
        codes = generate(batch_size, new_tokens + 1)
        results[batch_size] = (min(runs[batch_size, "prefill"]), per_step, batch_size / per_step, codes)
    return results


MID_SIZE_TEXT_CONFIG = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
}


def part_throughput(args):
    def build(dtype):
        model = build_model(
            text=MID_SIZE_TEXT_CONFIG,
            encoder=patch_config(256, 1024, 2, 8),
            decoder=patch_config(256, 1024, 4, 8),
            vocab_size=8192,
        )
        return model.to(dtype)

    parameters = sum(p.numel() for p in build(torch.float32).parameters()) / 1e6
    print(
        f"\n### Throughput, mid-size config ({parameters:.0f}M parameters: LLM 512 wide x 8 layers, patch decoder "
        f"256 wide x 4 layers), prompt {args.prompt_length} positions, {args.new_tokens} new positions, "
        f"{torch.get_num_threads()} threads\n"
    )
    modes = [
        ("eager, dynamic LLM cache", False, {}),
        ("eager, static LLM cache", False, {"cache_implementation": "static"}),
    ]
    if args.compile:
        modes.append(("compiled, frozen weights, static LLM cache", True, {"cache_implementation": "static"}))
    print("| dtype | mode | batch | prefill (ms) | decode step (ms) | patches/s | vs batch 1 | codes as eager |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        reference = {}
        for label, compiled, kwargs in modes:
            model = build(getattr(torch, dtype))
            if compiled:
                compile_frozen(
                    model.model.language_model, model.model.patch_encoder, model.patch_decoder, model.lm_head
                )
            results = throughput(model, args.batch_sizes, args.prompt_length, args.new_tokens, args.repeats, **kwargs)
            baseline = None
            for batch_size, (prefill, per_step, rate, codes) in results.items():
                baseline = baseline or rate
                same = (codes == reference.setdefault(batch_size, codes)).float().mean().item()
                print(
                    f"| {dtype} | {label} | {batch_size} | {prefill * 1e3:.1f} | {per_step * 1e3:.1f} | {rate:.1f} | "
                    f"{rate / baseline:.2f}x | {same:.0%} |",
                    flush=True,
                )
            torch._dynamo.reset()


@torch.no_grad()
def part_patch_decoder_cost(args):
    s = args.scale
    model = build_model(
        text={
            "hidden_size": 4096 // s,
            "intermediate_size": 11008 // s,
            "num_hidden_layers": 36,
            "num_attention_heads": 32 // s,
            "num_key_value_heads": max(8 // s, 1),
            "head_dim": 128,
            "tie_word_embeddings": False,
        },
        encoder=patch_config(1024 // s, 4096 // s, 6, 64 // s),
        decoder=patch_config(1024 // s, 4096 // s, 16, 64 // s),
        vocab_size=151680 // s,
    )
    config = model.config
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\n### Patch decoder vs LLM step, batch 1, released proportions / {s} ({parameters:.0f}M parameters: LLM "
        f"{4096 // s} wide x 36 layers, patch decoder {1024 // s} wide x 16 layers, "
        f"{config.patch_decoder_steps} decoder steps per patch), fp32, {torch.get_num_threads()} threads\n"
    )
    input_ids, audio = random_prompt(model, 1, args.prompt_length + 2)
    input_ids, audio = input_ids[:, 1:], audio[:, 1:]  # the last position is an audio position
    prefill = model(input_ids[:, :-1], audio[:, :-1], use_cache=True, logits_to_keep=1)
    cache = prefill.cache
    position_ids = torch.tensor([[args.prompt_length]])

    def llm_step():  # one audio position in, text logits and hidden state out (patch encoder included)
        model(
            input_ids[:, -1:], audio[:, -1:], cache=cache, position_ids=position_ids, use_cache=True, logits_to_keep=1
        )
        cache.crop(-1)

    generation_config = greedy_generation_config(model)
    warpers = model._audio_warpers(generation_config)
    patch_decoding = model._prepare_patch_decoding(torch.device("cpu"))
    hidden = prefill.last_hidden_state[:, -1]

    def patch():
        model._generate_audio_patch(hidden, patch_decoding, generation_config, warpers, keep_scores=False)

    print("| mode | LLM step (ms) | patch decoder per patch (ms) | patch decoder / LLM step |")
    print("|---|---|---|---|")
    modes = ["eager"] + (["compiled, frozen weights"] if args.compile else [])
    for mode in modes:
        if mode != "eager":
            compile_frozen(model.model.language_model, model.model.patch_encoder, model.patch_decoder, model.lm_head)
        llm_step()
        llm = best_time(llm_step, args.repeats)
        patch()
        seconds = best_time(patch, args.repeats)
        print(f"| {mode} | {llm * 1e3:.1f} | {seconds * 1e3:.1f} | {seconds / llm:.0%} |", flush=True)
    torch._dynamo.reset()
    patch_reads, llm_reads = weight_reads(model)
    print(
        f"\nWeights read at batch 1 (the bound when both are memory-bound, the same at every `--scale`): "
        f"{patch_reads / 1e6:.0f}M per patch vs {llm_reads / 1e6:.0f}M per LLM step = {patch_reads / llm_reads:.0%}."
    )


class CpuTimer:
    """Accumulates the time spent inside one module's forward calls (hooks around `module.__call__`)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        self._start = None
        self._hooks = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def remove(self):
        for hook in self._hooks:
            hook.remove()

    def _enter(self, module, args):
        self._start = clock()

    def _exit(self, module, args, output):
        self.seconds += clock() - self._start


REAL_TEXT_CONFIG = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": False,
}
REAL_LAYERS, REAL_VOCAB = 36, 151680


@torch.no_grad()
def part_real_width(args):
    """
    Patch decoder vs LLM step at the released widths, batch 1. A full 7B LLM does not fit the budget of this script,
    so the model is built with the real patch encoder (1024 x 6) and patch decoder (1024 x 16, 64 heads) but only 1
    of the 36 LLM layers and a small text vocabulary. The LLM step is one forward of an audio position against a KV
    cache of `--context` positions; the time inside its one layer and inside its small text head is measured with
    hooks, and the real step is extrapolated as `step - head_small + 35 x layer + head_real`, where `head_real` is a
    `1/4 x 151680`-row head timed on its own, x 4. The patch decoder is timed as it runs in `generate`
    (`_generate_audio_patch`: 11 steps x 16 layers, heads, embeddings), nothing extrapolated.
    """

    def build(dtype):
        model = build_model(
            text={**REAL_TEXT_CONFIG, "num_hidden_layers": 1},
            encoder=patch_config(1024, 4096, 6, 64),
            decoder=patch_config(1024, 4096, 16, 64),
            vocab_size=1024,
        )
        head_real = torch.nn.Linear(model.config.text_config.hidden_size, REAL_VOCAB // 4, bias=False)
        return model.to(dtype), head_real.to(dtype)

    print(
        f"\n### Patch decoder vs LLM step at the released widths, batch 1, KV cache of {args.context} positions, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| dtype | mode | LLM layer (ms) | text head (ms) | LLM step, 36 layers (ms, extrapolated) | patch decoder "
        "per patch (ms, measured) | patch decoder / LLM step |"
    )
    print("|---|---|---|---|---|---|---|")
    modes = ["eager"] + (["compiled, frozen weights"] if args.compile else [])
    for dtype in args.dtypes:
        for mode in modes:
            model, head_real = build(getattr(torch, dtype))
            if mode != "eager":
                compile_frozen(
                    model.model.language_model.layers[0],
                    model.model.patch_encoder,
                    model.patch_decoder,
                    model.lm_head,
                    head_real,
                )
            layer, head, llm, patch, layers = real_width_times(model, head_real, args.context, args.repeats)
            print(
                f"| {dtype} | {mode} | {layer * 1e3:.1f} | {head * 1e3:.1f} | {llm * 1e3:.0f} | "
                f"{patch * 1e3:.0f} ({layers / patch:.0%} in its layers) | {patch / llm:.0%} |",
                flush=True,
            )
            torch._dynamo.reset()
    text_config = model.config.text_config
    patch_reads, llm_reads = weight_reads(model)
    layer_params = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    llm_reads += (REAL_LAYERS - 1) * layer_params + (REAL_VOCAB - text_config.vocab_size) * text_config.hidden_size
    print(
        f"\nWeights read at batch 1: {patch_reads / 1e6:.0f}M per patch vs {llm_reads / 1e6:.0f}M per LLM step = "
        f"{patch_reads / llm_reads:.0%}."
    )


def real_width_times(model, head_real, context: int, repeats: int) -> tuple[float, ...]:
    """
    Seconds of one LLM layer, the real text head, the extrapolated LLM step, one patch and the part of that patch
    spent in the patch decoder's forward (its layers), at batch 1; each the fastest of `repeats` runs. Each run times
    an LLM step, the real head and a patch one after the other, so that a slow phase of a shared machine (other jobs
    using the memory bandwidth) reaches all three alike.
    """
    text_config = model.config.text_config
    dtype = model.dtype
    input_ids, audio = random_prompt(model, 1, 2)  # position 1 is an audio position
    input_ids, audio = input_ids[:, 1:], audio[:, 1:]
    shape = (1, text_config.num_key_value_heads, context, text_config.head_dim)
    cache = DynamicCache(config=text_config)
    cache.update(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), 0)
    position_ids = torch.tensor([[context]])
    head_input = torch.randn(1, 1, text_config.hidden_size, dtype=dtype)
    generation_config = greedy_generation_config(model)
    warpers = model._audio_warpers(generation_config)
    patch_decoding = model._prepare_patch_decoding(torch.device("cpu"))

    def llm_step():
        output = model(input_ids, audio, cache=cache, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        cache.crop(-1)
        return output.last_hidden_state[:, -1]

    hidden = llm_step()

    def patch():
        model._generate_audio_patch(hidden, patch_decoding, generation_config, warpers, keep_scores=False)

    head_real(head_input)
    patch()  # warm-ups
    timers = {
        "layer": CpuTimer(model.model.language_model.layers[0]),
        "head": CpuTimer(model.lm_head),
        "decoder": CpuTimer(model.patch_decoder),
    }
    runs = {key: [] for key in ("step", "layer", "head", "head_real", "patch", "decoder")}
    for _ in range(repeats):
        for timer in timers.values():
            timer.seconds = 0.0
        for key, fn in (("step", llm_step), ("head_real", lambda: head_real(head_input)), ("patch", patch)):
            start = clock()
            fn()
            runs[key].append(clock() - start)
        for key, timer in timers.items():
            runs[key].append(timer.seconds)
    for timer in timers.values():
        timer.remove()
    layer = min(runs["layer"])
    head = min(runs["head_real"]) * REAL_VOCAB / head_real.out_features
    llm = min(runs["step"]) - min(runs["head"]) + (REAL_LAYERS - 1) * layer + head
    patch_seconds, decoder_seconds = min(zip(runs["patch"], runs["decoder"]))
    return layer, head, llm, patch_seconds, decoder_seconds


def weight_reads(model) -> tuple[int, int]:
    """Parameters read per patch (every decoder step reads all layers; each head serves `group_size` steps) and
    per LLM step (backbone, text head and the patch encoder of the input position)."""
    config = model.config

    def count(module):
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    decoder = model.patch_decoder
    steps = config.patch_decoder_steps
    patch = (
        steps * (count(decoder.layers) + count(decoder.norm))
        + config.group_size * count(decoder.heads)
        + count(decoder.input_proj)
        + (steps - 1) * count(decoder.embeddings_proj)
    )
    llm = count(model.model.language_model) - count(model.get_input_embeddings())
    llm += count(model.lm_head) + count(model.model.patch_encoder)
    return patch, llm


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt length in LLM positions")
    parser.add_argument("--new-tokens", type=int, default=8, help="decode steps timed per generate call")
    parser.add_argument("--repeats", type=int, default=5, help="timings are the fastest of this many runs")
    parser.add_argument("--scale", type=int, default=4, help="width divisor of the released proportions (part 2)")
    parser.add_argument("--context", type=int, default=1024, help="LLM KV cache length in the real-width part")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes of the throughput and real-width parts"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: process CPU time, robust on a shared machine with --threads 1; wall: elapsed time",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    parser.add_argument("--part", choices=["all", "throughput", "cost", "real"], default="all")
    args = parser.parse_args()
    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{'process CPU' if CLOCK == 'cpu' else 'wall'} time"
    )
    if args.part in ("all", "throughput"):
        part_throughput(args)
    if args.part in ("all", "cost"):
        part_patch_decoder_cost(args)
    if args.part in ("all", "real"):
        part_real_width(args)


if __name__ == "__main__":
    main()
