"""Supervised fine-tuning of MiMo-Audio with the Transformers `Trainer` and `MiMoAudioDataCollator`, LoRA or full, on
one or many processes (`accelerate launch`: DDP, DeepSpeed ZeRO-2 / ZeRO-3 or FSDP2 with the configs in
examples/accelerate/). Each training item is one ASR sample (speech in, text out) and one TTS sample (text in, speech
out) of the same record, so every micro-batch runs the patch encoder and the patch decoder: under ZeRO-3 / FSDP2 each
process must run the same sharded modules at every step.

Tiny random model and codec from the test fixtures, 2 CPU processes (`--multi_gpu` is the `accelerate launch` flag
that starts several processes, also on a host without GPUs):

    accelerate launch --multi_gpu --num_processes 2 examples/sft_trainer.py \
        --model tests/fixtures/golden/lm_a/checkpoint --audio_tokenizer tests/fixtures/golden/tok_a/checkpoint \
        --use_cpu --output_dir sft-tiny

The released model on 8 GPUs, LoRA with DDP, or full fine-tuning with FSDP2 / ZeRO-3 (docs/training.md has the memory
per GPU of each):

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 examples/sft_trainer.py \
        --model path/to/MiMo-Audio-7B-Instruct --audio_tokenizer path/to/MiMo-Audio-Tokenizer \
        --data train.jsonl --bf16 --gradient_checkpointing --max_steps 1000 --output_dir mimo-audio-lora
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/sft_trainer.py \
        --model path/to/MiMo-Audio-7B-Instruct --audio_tokenizer path/to/MiMo-Audio-Tokenizer \
        --data train.jsonl --bf16 --gradient_checkpointing --full_finetune --learning_rate 1e-5 --output_dir mimo-audio-sft

`--data` is JSON lines of `{"audio": path, "text": transcript}`. Without it, the clip of tests/fixtures/audio is used.
"""

import argparse
import json
from pathlib import Path

from accelerate import PartialState
from finetune_lora import DEFAULT_DATA, build_samples
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from transformers_mimo import (
    MiMoAudioDataCollator,
    MiMoAudioForConditionalGeneration,
    MiMoAudioProcessor,
    get_lora_target_modules,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MiMo-Audio checkpoint (converted or original layout).")
    parser.add_argument("--audio_tokenizer", required=True, help="MiMo-Audio-Tokenizer checkpoint (the codec).")
    parser.add_argument("--data", help="JSON lines of {'audio': path, 'text': transcript}.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--use_cpu", action="store_true", help="Train on CPU (gloo between processes).")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs); weights stay fp32 masters.")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--full_finetune", action="store_true", help="Train every weight instead of LoRA.")
    parser.add_argument("--lora_preset", default="language_model_and_patch_decoder")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--per_device_batch_size", type=int, default=1, help="Items (ASR + TTS pairs) per process.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Trains, saves the adapter (or the model) and returns the Trainer's log history."""
    args = parse_args(argv)
    state = PartialState(cpu=args.use_cpu)
    model = MiMoAudioForConditionalGeneration.from_pretrained(args.model)
    # The codec encodes the samples' audio once, on this process's device.
    processor = MiMoAudioProcessor.from_pretrained(
        args.model, audio_tokenizer=args.audio_tokenizer, device=state.device
    )
    records = DEFAULT_DATA
    if args.data:
        lines = Path(args.data).read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    samples = build_samples(processor, records)  # ASR, TTS, ASR, TTS, ...
    collator = MiMoAudioDataCollator(processor.tokenizer, model.config.audio_empty_ids)
    # One item = the ASR and the TTS sample of a record, kept as a padded pair (the collator unpads and re-pads).
    items = []
    for asr, tts in zip(samples[::2], samples[1::2]):
        pair = collator([asr, tts])
        items.append({key: pair[key] for key in ("input_ids", "audio_input_ids", "attention_mask")})
    if not args.full_finetune:
        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.05,
            target_modules=get_lora_target_modules(args.lora_preset),
        )
        model = get_peft_model(model, lora)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        use_cpu=args.use_cpu,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        per_device_train_batch_size=args.per_device_batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # keep `audio_input_ids`
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=items, data_collator=collator)
    trainer.train()
    trainer.save_model(args.output_dir)
    if state.is_main_process:
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print(f"step {entry['step']}: loss {entry['loss']:.4f}")
    return trainer.state.log_history


if __name__ == "__main__":
    main()
