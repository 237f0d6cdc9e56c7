"""GRPO for speech output (TTS) with TRL: the policy answers with a speech stream (text chunks and audio patches); the
loss scores the text tokens AND the audio codes it sampled; the reward is computed on the decoded waveform by a
user-supplied callable. LoRA on the LLM and the patch decoder; `MiMoAudioGRPOTrainer` (TRL's GRPOTrainer with the
audio channel). Each process generates its rollouts in one batched `generate` call per step.

The reward here is cheap on purpose: how close the speech's duration is to a target read off the text (0.3 s per word,
0.25 s per Chinese character). Swap in your own callable taking `completion_audio` (the waveforms at 24 kHz, `None`
for a completion without speech), e.g. an ASR model's WER against the text or a speaker-similarity score.

Tiny random model and codec from the test fixtures, 2 CPU processes (on a host without GPUs, `--multi_gpu` is the
`accelerate launch` flag that starts several processes). A random model almost never chooses audio, so
`--empty_token_bias 4` pushes its text head towards `<|empty|>` (an audio patch); leave it at 0 for real checkpoints:

    accelerate launch --multi_gpu --num_processes 2 examples/grpo_tts.py \
        --model tests/fixtures/golden/lm_a/checkpoint --audio_tokenizer tests/fixtures/golden/tok_a/checkpoint \
        --use_cpu --empty_token_bias 4 --output_dir grpo-tts-tiny

The released model on 8 GPUs (DDP, bf16):

    accelerate launch --multi_gpu --num_processes 8 examples/grpo_tts.py \
        --model path/to/MiMo-Audio-7B-Instruct --audio_tokenizer path/to/MiMo-Audio-Tokenizer \
        --data texts.txt --bf16 --gradient_checkpointing --max_steps 500 --max_completion_length 512 \
        --output_dir mimo-audio-grpo-tts

`--data` is a text file with one sentence per line.
"""

import argparse
import math
import re
from pathlib import Path

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


DEFAULT_TEXTS = ["Today is a nice day.", "今天天气如何？"]
TTS_INSTRUCTION = {"en": "Please convert this text to speech", "zh": "请将这段文字转换为语音"}
_CJK = re.compile(r"[\u3400-\u9fff]")
SAMPLING_RATE = 24000


def target_seconds(text: str) -> float:
    """A rough speaking time: 0.25 s per Chinese character, 0.3 s per other word."""
    characters = len(_CJK.findall(text))
    words = len(_CJK.sub(" ", text).split())
    return 0.25 * characters + 0.3 * words


def duration_reward(completions, completion_audio, text, **kwargs) -> list[float]:
    """TRL reward function on the waveforms: minus the distance (s) between the speech's duration and the target.
    A completion without speech has duration 0."""
    return [
        -abs((0.0 if audio is None else audio.shape[-1] / SAMPLING_RATE) - target_seconds(sentence))
        for audio, sentence in zip(completion_audio, text)
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MiMo-Audio checkpoint (converted or original layout).")
    parser.add_argument("--audio_tokenizer", required=True, help="MiMo-Audio-Tokenizer checkpoint (the codec).")
    parser.add_argument("--data", help="A text file, one sentence per line.")
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
    parser.add_argument(
        "--empty_token_bias",
        type=float,
        default=0.0,
        help="Logit bias on <|empty|> during sampling, for random test checkpoints only (0 for real ones).",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_dataset(texts: list[str], rows: int) -> Dataset:
    """One TTS request per text (as the original's TTS prompt), repeated to at least `rows` rows."""
    prompts = [
        {
            "prompt": [{"role": "user", "content": f"{TTS_INSTRUCTION['zh' if _CJK.search(t) else 'en']}: {t}"}],
            "text": t,
        }
        for t in texts
    ]
    return Dataset.from_list(prompts * math.ceil(rows / len(prompts)))


def main(argv=None) -> list[dict]:
    """Trains and returns the Trainer's log history."""
    args = parse_args(argv)
    state = PartialState(cpu=args.use_cpu)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = MiMoAudioForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    # The codec decodes the generated speech for the reward on this process's device.
    processor = MiMoAudioProcessor.from_pretrained(
        args.model, audio_tokenizer=args.audio_tokenizer, device=state.device
    )
    texts = DEFAULT_TEXTS
    if args.data:
        texts = [line.strip() for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    generation_kwargs = {
        # Stop where the original's TTS stops (<|endoftext|>, <|im_end|>, <|eostm|>); text and audio are both sampled
        # at temperature 1 with no top-k / top-p, so the log-probabilities are those of the sampling distribution.
        "eos_token_id": processor.generation_kwargs("tts")["eos_token_id"],
        "audio_temperature": 1.0,
    }
    if args.empty_token_bias:
        generation_kwargs["sequence_bias"] = {(processor.empty_token_id,): args.empty_token_bias}
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
        disable_dropout=True,
        generation_kwargs=generation_kwargs,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = MiMoAudioGRPOTrainer(
        model=model,
        reward_funcs=duration_reward,
        processor=processor,
        args=config,
        train_dataset=build_dataset(texts, prompts_per_step * args.max_steps),
        output_modality="audio",  # the answer opens with <|sostm|>
        peft_config=LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            target_modules=get_lora_target_modules("language_model_and_patch_decoder"),
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
