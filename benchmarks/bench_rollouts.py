"""Rollout throughput for RL (GRPO) on random weights: rollouts per second when a process generates its rollout batch
in one batched `generate` call (as `MiMoAudioGRPOTrainer` does), against one call per rollout (batch 1).

Model: the mid-size config of `bench_generate.py` (41M parameters: LLM 512 wide x 8 layers, patch decoder 256 wide x
4 layers, 8 codebooks of 1025 / 129 codes), fp32, with a LoRA adapter (r 16 on the LLM and the patch decoder, as
in the GRPO examples) unless `--no-lora`. Prompt: `--prompt-length` positions, every other one an audio patch (speech
in the prompt). Each rollout samples `--completion-length` positions at temperature 1 (text and audio), in two
workloads: "speech" (every position is an audio patch, as in TTS / spoken dialogue rollouts) and "text" (`<|empty|>`
banned, as in ASR rollouts). The scoring column is the `compute_logprobs` pass over prompt + completion of the whole
batch (no gradient), which GRPO runs once more with gradients.

    python benchmarks/bench_rollouts.py                                  # CPU, 1 thread, about 2 minutes
    python benchmarks/bench_rollouts.py --device cuda --batch-sizes 1 8 32 64 --completion-length 64

Times are the fastest of `--repeats` runs; on CPU by process CPU time (robust on a shared machine with 1 thread), on
CUDA by wall time after synchronisation.
"""

import argparse
import importlib.util
import platform
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from transformers_mimo import compute_logprobs, get_lora_target_modules


_spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("bench_generate.py"))
bench_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_generate)


def mid_size_model(lora: bool):
    model = bench_generate.mid_size_model()
    if lora:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(r=16, target_modules=get_lora_target_modules("language_model_and_patch_decoder"))
        model = get_peft_model(model, lora_config)
    return model.eval()


def timer(device: torch.device):
    """A function returning seconds: process CPU time on CPU, wall time after synchronising on CUDA."""
    if device.type == "cuda":

        def now():
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.process_time


@torch.no_grad()
def rollout_times(model, batch_sizes, prompt_length, completion_length, workload, repeats, device) -> dict:
    """
    For each batch size R: (seconds of one batched `generate` of R rollouts, seconds of the `compute_logprobs` pass
    over the R prompt + completion sequences). Every batch size is timed once per repeat, one after the other, and
    each time is the fastest over the repeats.
    """
    config = model.config
    now = timer(device)
    if workload == "speech":
        controls = {"logits_processor": LogitsProcessorList([bench_generate.ChooseAudio(config.empty_token_id)])}
    elif workload == "text":
        controls = {"suppress_tokens": [config.empty_token_id]}
    else:
        raise ValueError(f"Unknown workload {workload!r}.")
    prompts = {
        size: tuple(t.to(device) for t in bench_generate.random_prompt(model, size, prompt_length))
        for size in batch_sizes
    }

    def generate(size):
        input_ids, audio = prompts[size]
        out = model.generate(
            input_ids=input_ids,
            audio_input_ids=audio,
            max_new_tokens=completion_length,
            min_new_tokens=completion_length,
            eos_token_id=None,
            do_sample=True,
            temperature=1.0,
            top_k=None,
            top_p=1.0,
            return_dict_in_generate=True,
            **controls,
        )
        assert out.sequences.shape[1] == prompt_length + completion_length
        return out

    outputs = {size: generate(size) for size in batch_sizes}  # warm-up; the scored sequences
    for size, out in outputs.items():
        is_audio = out.sequences[:, prompt_length:] == config.empty_token_id
        assert is_audio.all() if workload == "speech" else not is_audio.any()
    runs = {(size, kind): [] for size in batch_sizes for kind in ("generate", "score")}
    for _ in range(repeats):
        for size in batch_sizes:
            start = now()
            generate(size)
            runs[size, "generate"].append(now() - start)
            start = now()
            compute_logprobs(model, outputs[size].sequences, outputs[size].audio_sequences)
            runs[size, "score"].append(now() - start)
    return {size: (min(runs[size, "generate"]), min(runs[size, "score"])) for size in batch_sizes}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="rollouts per generate")
    parser.add_argument("--prompt-length", type=int, default=64, help="prompt length in LLM positions")
    parser.add_argument("--completion-length", type=int, default=16, help="sampled positions per rollout")
    parser.add_argument("--workloads", nargs="+", default=["speech", "text"], choices=["speech", "text"])
    parser.add_argument("--repeats", type=int, default=2, help="timings are the fastest of this many runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--no-lora", dest="lora", action="store_false", help="the base model, without an adapter")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mid_size_model(args.lora).to(device)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.device}, {torch.get_num_threads()} threads; "
        f"mid-size model, {parameters:.0f}M parameters{' with LoRA r 16' if args.lora else ''}, fp32; prompt "
        f"{args.prompt_length} positions, {args.completion_length} sampled positions per rollout\n"
    )
    print(
        "| workload | rollouts per generate | generate (s) | rollouts/s | vs one call per rollout | scoring pass (s) |"
    )
    print("|---|---|---|---|---|---|")
    for workload in args.workloads:
        results = rollout_times(
            model, args.batch_sizes, args.prompt_length, args.completion_length, workload, args.repeats, device
        )
        single = None
        for size, (generate_time, score_time) in results.items():
            rate = size / generate_time
            single = single or (rate if size == 1 else None)
            ratio = f"{rate / single:.2f}x" if single else "-"
            print(
                f"| {workload} | {size} | {generate_time:.3f} | {rate:.1f} | {ratio} | {score_time:.3f} |", flush=True
            )


if __name__ == "__main__":
    main()
