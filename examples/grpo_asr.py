"""GRPO for speech recognition with TRL: speech in the prompt, reward = -(word or character) error rate of the decoded
transcript against the reference. LoRA on the LLM; `MiMoAudioGRPOTrainer` (TRL's GRPOTrainer with the audio channel).

Tiny random model and codec from the test fixtures, 2 CPU processes (on a host without GPUs, `--multi_gpu` is the
`accelerate launch` flag that starts several processes; `--cpu` would start one):

    accelerate launch --multi_gpu --num_processes 2 examples/grpo_asr.py \
        --model tests/fixtures/golden/lm_a/checkpoint --audio_tokenizer tests/fixtures/golden/tok_a/checkpoint \
        --use_cpu --output_dir grpo-asr-tiny

The released model on 8 GPUs (DDP, bf16; see docs/training.md for memory and the DeepSpeed ZeRO-2 config):

    accelerate launch --multi_gpu --num_processes 8 examples/grpo_asr.py \
        --model path/to/MiMo-Audio-7B-Instruct --audio_tokenizer path/to/MiMo-Audio-Tokenizer \
        --data train.jsonl --bf16 --gradient_checkpointing --max_steps 500 --max_completion_length 128 \
        --output_dir mimo-audio-grpo-asr

`--data` is JSON lines of `{"audio": path, "text": transcript}`. Without it, the clip of tests/fixtures/audio is used.
"""

import argparse
import json
import math
import re
from pathlib import Path

import jiwer
import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig

from transformers_mimo import (
    MiMoAudioForConditionalGeneration,
    MiMoAudioGRPOTrainer,
    MiMoAudioProcessor,
    get_lora_target_modules,
)


REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [{"audio": str(REPO / "tests/fixtures/audio/weather_today_zh.mp3"), "text": "今天天气如何？"}]
ASR_INSTRUCTION = "Please convert the recording to written format"
_CJK = re.compile(r"[\u3400-\u9fff]")
_PUNCTUATION = re.compile(r"[^\w\s]")


def error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate, or character error rate when the reference is Chinese / Japanese; punctuation and case
    ignored. An empty hypothesis scores 1."""
    reference = _PUNCTUATION.sub("", reference).lower().strip()
    hypothesis = _PUNCTUATION.sub("", hypothesis).lower().strip()
    if not reference:
        raise ValueError("Empty reference transcript.")
    if not hypothesis:
        return 1.0
    if _CJK.search(reference):
        return jiwer.cer(reference.replace(" ", ""), hypothesis.replace(" ", ""))
    return jiwer.wer(reference, hypothesis)


def negative_error_rate(completions, reference, **kwargs) -> list[float]:
    """TRL reward function: `completions` are the decoded answers (conversational: one assistant message each)."""
    return [-error_rate(ref, completion[0]["content"]) for completion, ref in zip(completions, reference)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MiMo-Audio checkpoint (converted or original layout).")
    parser.add_argument("--audio_tokenizer", required=True, help="MiMo-Audio-Tokenizer checkpoint (the codec).")
    parser.add_argument("--data", help="JSON lines of {'audio': path, 'text': transcript}.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--use_cpu", action="store_true", help="Train on CPU (gloo between processes).")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (GPUs).")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--per_device_batch_size", type=int, default=4, help="Rollouts per process per step.")
    parser.add_argument("--num_generations", type=int, default=4, help="Completions per prompt (the GRPO group).")
    parser.add_argument("--max_completion_length", type=int, default=16, help="LLM positions per completion.")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight against the model without the adapter.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_dataset(records: list[dict], rows: int) -> Dataset:
    """One ASR prompt per record (the audio, then the instruction), repeated to at least `rows` rows."""
    prompts = [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": [{"type": "audio", "path": record["audio"]}, {"type": "text", "text": ASR_INSTRUCTION}],
                }
            ],
            "reference": record["text"],
        }
        for record in records
    ]
    return Dataset.from_list(prompts * math.ceil(rows / len(prompts)))


def main(argv=None) -> list[dict]:
    """Trains and returns the Trainer's log history."""
    args = parse_args(argv)
    state = PartialState(cpu=args.use_cpu)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = MiMoAudioForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    # The codec encodes the prompts' audio on this process's device.
    processor = MiMoAudioProcessor.from_pretrained(
        args.model, audio_tokenizer=args.audio_tokenizer, device=state.device
    )
    records = DEFAULT_DATA
    if args.data:
        lines = Path(args.data).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    prompts_per_step = args.per_device_batch_size * state.num_processes // args.num_generations
    config = GRPOConfig(
        output_dir=args.output_dir,
        use_cpu=args.use_cpu,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        per_device_train_batch_size=args.per_device_batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        beta=args.beta,
        disable_dropout=True,  # log-probabilities of the distributions generation samples from
        # Stop at the end of the answer, as the original's ASR does (<|endoftext|>, <|im_end|>).
        generation_kwargs={"eos_token_id": processor.generation_kwargs("asr")["eos_token_id"]},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = MiMoAudioGRPOTrainer(
        model=model,
        reward_funcs=negative_error_rate,
        processor=processor,
        args=config,
        train_dataset=build_dataset(records, prompts_per_step * args.max_steps),
        peft_config=LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            target_modules=get_lora_target_modules("language_model"),  # text answers: the LLM only
        ),
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if state.is_main_process:
        for entry in trainer.state.log_history:
            if "reward" in entry:
                print(f"step {entry['step']}: reward {entry['reward']:.3f}  loss {entry['loss']:.4f}")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
