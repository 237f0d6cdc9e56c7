"""Generation speed of this package against the ORIGINAL MiMo-Audio code, same checkpoint, same prompts, one sitting.

Uses the harness in `../shared/bench` (see its README): `make_bench_ckpt.py` builds the mid-size checkpoint in the
original format with the original classes, `time_original.py` times the original `generate` (batch 1, and "batch 8" as
8 sequential batch-1 runs). This script first runs `time_original.py` with `--orig-python` (the original's own
environment: torch 2.13, transformers 4.49), then times this package on the same checkpoint, loaded directly from the
original directory, with the same prompts and the same all-speech greedy workload (64-position prompt, 32 new patches):

- b1: `generate(max_new_tokens=32)` at batch 1; b8: ONE batched `generate` over the 8 prompts of the original's 8 runs;
- time counted from the end of the prefill forward to the return of `generate` (as `time_original.py` counts it),
  best of `--repeats` runs, batch sizes interleaved so that a slow phase of a shared host reaches both;
- modes: `eager` (the defaults) and `compiled` (`generate(..., compile=True)`: static caches, the decode step and the
  whole patch compiled by `torch.compile`). The compilation time (first call per batch size) is reported.

    python benchmarks/bench_vs_original.py --bench-dir ../shared/bench --ckpt $BENCH/ckpt \\
        --orig-python $BENCH/orig/bin/python --mimo-ref $BENCH/MiMo-Audio

Prints a Markdown table (patches/s and the ratio to the original) and writes `--json`.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


_spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("bench_generate.py"))
bench_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_generate)

ORIGINAL_B1 = "(b) b1 gen 32 patches, after prefill [patches/s]"
ORIGINAL_B8 = "(d) b8 = 8 x b1 sequential, after prefill [patches/s]"


def run_original(args) -> dict:
    """Runs the harness's `time_original.py` in the original's environment; returns its `table`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "orig.json")
        command = [
            args.orig_python,
            os.path.join(args.bench_dir, "time_original.py"),
            "--ckpt", args.ckpt, "--json", out, "--threads", str(args.threads),
            "--repeats", str(args.repeats), "--repeats-b8", str(args.repeats_b8),
        ]  # fmt: skip
        if args.mimo_ref:
            command += ["--ref", args.mimo_ref]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["table"]


def load_port(args):
    """The package's model on the harness checkpoint, with the harness's special-token ids and prompts."""
    sys.path.insert(0, os.path.abspath(args.bench_dir))
    from time_original import BATCH8, build_prompt, load_special_ids
    from time_port import _Shim, to_port_inputs

    from transformers_mimo import MiMoAudioConfig, MiMoAudioForConditionalGeneration

    ids_map = load_special_ids(args.ckpt)
    special = {
        f"{name}_token_id": ids_map[f"{name}_idx"] for name in ("empty", "sosp", "eosp", "sostm", "eostm", "eot")
    }
    config_dict, _ = MiMoAudioConfig.get_config_dict(args.ckpt)
    config = MiMoAudioConfig.from_dict({**config_dict, **special})
    model = MiMoAudioForConditionalGeneration.from_pretrained(
        args.ckpt, config=config, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    shim = _Shim(config)
    prompts = [to_port_inputs(build_prompt(shim, ids_map, seed), config.group_size, config.audio_channels)
               for seed in range(BATCH8)]  # fmt: skip
    batch1 = prompts[0]
    batch8 = (torch.cat([ids for ids, _ in prompts]), torch.cat([audio for _, audio in prompts]))
    return model, batch1, batch8


def timed_generate(model, inputs, new_patches: int, extra: dict) -> float:
    """Seconds from the end of the prefill forward to the return of `generate`; checks the all-speech workload."""
    input_ids, audio_input_ids = inputs
    marks = []

    def end_of_prefill(module, args, output):  # removes itself: no hook inside the (compiled) decode steps
        marks.append(time.perf_counter())
        hook.remove()

    hook = model.model.language_model.register_forward_hook(end_of_prefill)
    try:
        out = model.generate(
            input_ids=input_ids,
            audio_input_ids=audio_input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_patches,
            min_new_tokens=0,
            do_sample=False,
            audio_do_sample=False,
            **extra,
        )
        end = time.perf_counter()
    finally:
        hook.remove()
    new = out.sequences[:, input_ids.shape[1] :]
    if new.shape[1] != new_patches or not bool((new == model.config.empty_token_id).all()):
        raise RuntimeError(f"not an all-speech {new_patches}-patch generation: {new.shape}")
    return end - marks[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-dir", required=True, help="the harness folder (../shared/bench)")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by make_bench_ckpt.py")
    parser.add_argument("--orig-python", help="python of the original's environment (runs time_original.py first)")
    parser.add_argument("--orig-json", help="instead of --orig-python: a time_original.py --json output")
    parser.add_argument("--mimo-ref", help="checkout of XiaomiMiMo/MiMo-Audio @ 691ce54 (default: $MIMO_REF)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repeats-b8", type=int, default=3)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.orig_python:
        original = run_original(args)
    elif args.orig_json:
        with open(args.orig_json) as f:
            original = json.load(f)["table"]
    else:
        parser.error("pass --orig-python (runs the original now) or --orig-json")
    original_b1 = original[ORIGINAL_B1]["min_time_value"]
    original_b8 = original[ORIGINAL_B8]["min_time_value"]

    model, batch1, batch8 = load_port(args)
    from time_original import N_NEW_PATCHES

    torch._dynamo.config.recompile_limit = 64
    modes = {"eager": {}, "compiled": {"compile": True, "cache_implementation": "static"}}
    results = {"original": {"b1": original_b1, "b8": original_b8}, "modes": {}}
    for mode in args.modes.split(","):
        extra = modes[mode]
        warm = {}
        for name, inputs in (("b1", batch1), ("b8", batch8)):
            start = time.perf_counter()
            timed_generate(model, inputs, N_NEW_PATCHES, extra)
            warm[name] = time.perf_counter() - start
        times = {"b1": [], "b8": []}
        for repeat in range(max(args.repeats, args.repeats_b8)):
            if repeat < args.repeats:
                times["b1"].append(timed_generate(model, batch1, N_NEW_PATCHES, extra))
            if repeat < args.repeats_b8:
                times["b8"].append(timed_generate(model, batch8, N_NEW_PATCHES, extra))
        results["modes"][mode] = {
            "b1": N_NEW_PATCHES / min(times["b1"]),
            "b8": batch8[0].shape[0] * N_NEW_PATCHES / min(times["b8"]),
            "first_call_s": warm,
        }

    print(
        f"\nHost: {bench_generate.cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32; original {original_b1:.2f} / {original_b8:.2f} patches/s\n"
    )
    print("| | batch 1 (patches/s) | batch 8 (patches/s) | first call b1 / b8 (s) |")
    print("|---|---:|---:|---:|")
    print(f"| original | {original_b1:.2f} | {original_b8:.2f} (8 sequential runs) | |")
    for mode, row in results["modes"].items():
        print(
            f"| this package, {mode} | {row['b1']:.2f} ({row['b1'] / original_b1:.2f}x) | "
            f"{row['b8']:.2f} ({row['b8'] / original_b8:.2f}x) | "
            f"{row['first_call_s']['b1']:.1f} / {row['first_call_s']['b8']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
