"""LoRA supervised fine-tuning of MiMo-Audio on ASR-style (speech in, text out) and TTS-style (text in, speech out)
samples, with the official recipe's masking (only the assistant replies are trained, text and audio).

Tiny random model from the test fixtures, on CPU (a few seconds):

    python examples/finetune_lora.py \
        --model tests/fixtures/golden/lm_a/checkpoint --audio_tokenizer tests/fixtures/golden/tok_a/checkpoint

The released model on a GPU, 4-bit (QLoRA):

    python examples/finetune_lora.py --model XiaomiMiMo/MiMo-Audio-7B-Instruct \
        --audio_tokenizer XiaomiMiMo/MiMo-Audio-Tokenizer --device cuda --dtype bfloat16 --load_in_4bit \
        --data my_data.jsonl --steps 1000 --output_dir mimo-audio-lora

MiMo-V2.5-ASR (an original or converted directory; tiny: tests/fixtures/golden/v25_lm_a/checkpoint) is trained on
its own ASR layout only: the answer opens with the language tag (`<chinese>` / `<english>`, from the record's
`"language"`: "zh" / "en"; no tag without one) followed by the transcript, after an instruction drawn from its
template sentences, exactly as `processor.asr(audio, language=None)` prompts it at inference.

`--data` is a JSON-lines file of `{"audio": "path/to/clip.wav", "text": "its transcript", "language": "zh"}`
(`language` optional, used by MiMo-V2.5-ASR); each line gives one ASR sample and, for MiMo-Audio, one TTS sample.
Without it, the clip of tests/fixtures/audio is used.
"""

import argparse
import json
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from transformers_mimo import (
    QUANTIZATION_SKIP_MODULES,
    V25_ASR_INSTRUCTIONS,
    V25_LANGUAGE_TAGS,
    MiMoAudioDataCollator,
    MiMoAudioForConditionalGeneration,
    MiMoAudioProcessor,
    get_lora_target_modules,
)


REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [
    {"audio": str(REPO / "tests/fixtures/audio/weather_today_zh.mp3"), "text": "今天天气如何？", "language": "zh"}
]
ASR_INSTRUCTION = "Please convert the recording to written format"
TTS_INSTRUCTION = "Please convert this text to speech"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MiMo-Audio checkpoint (converted or original layout).")
    parser.add_argument("--audio_tokenizer", required=True, help="MiMo-Audio-Tokenizer checkpoint (the codec).")
    parser.add_argument("--data", help="JSON lines of {'audio': path, 'text': transcript, 'language': 'zh'|'en'}.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--load_in_4bit", action="store_true", help="QLoRA: nf4 LLM weights (bitsandbytes).")
    parser.add_argument("--load_in_8bit", action="store_true", help="int8 LLM weights (bitsandbytes).")
    parser.add_argument("--lora_preset", default="language_model_and_patch_decoder")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", help="Where to save the LoRA adapter.")
    return parser.parse_args(argv)


def load_model(args):
    dtype = getattr(torch, args.dtype)
    kwargs = {"dtype": dtype}
    if args.load_in_4bit or args.load_in_8bit:
        if args.load_in_4bit and args.load_in_8bit:
            raise ValueError("Choose one of --load_in_4bit and --load_in_8bit.")
        # Only the LLM's linear layers are quantized (docs/quantization.md).
        skip = list(QUANTIZATION_SKIP_MODULES)
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip
            )
            if args.load_in_4bit
            else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        )
        kwargs["device_map"] = args.device
    model = MiMoAudioForConditionalGeneration.from_pretrained(args.model, **kwargs)
    if "quantization_config" in kwargs:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model.to(args.device)
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules=get_lora_target_modules(args.lora_preset),
    )
    return get_peft_model(model, lora_config)


def build_v25_asr_sample(processor, record: dict) -> dict:
    """
    A MiMo-V2.5-ASR sample: the audio and an instruction drawn as the original does, then the answer: the language
    tag and the transcript (the tag is trained; at inference it ends the prompt when a language is given).
    """
    language = record.get("language")
    if language not in V25_LANGUAGE_TAGS:
        raise ValueError(f"`language` of {record['audio']!r} must be 'zh', 'en' or absent, got {language!r}.")
    pool = V25_ASR_INSTRUCTIONS[language] if language else V25_ASR_INSTRUCTIONS["zh"] + V25_ASR_INSTRUCTIONS["en"]
    conversation = [
        {
            "role": "user",
            "content": [{"type": "audio", "path": record["audio"]}, {"type": "text", "text": random.choice(pool)}],
        },
        {"role": "assistant", "content": V25_LANGUAGE_TAGS[language] + record["text"], "thinking": ""},
    ]
    return dict(processor.apply_chat_template(conversation, add_generation_prompt=False))


def build_samples(processor, records: list[dict]) -> list[dict]:
    """One ASR sample (audio -> transcript) and one TTS sample (transcript -> audio) per record; MiMo-V2.5-ASR
    checkpoints get their ASR sample only."""
    if processor.model_variant == "mimo-v2.5-asr":
        return [build_v25_asr_sample(processor, record) for record in records]
    samples = []
    for record in records:
        audio = {"type": "audio", "path": record["audio"]}
        asr = [
            {"role": "user", "content": [audio, {"type": "text", "text": ASR_INSTRUCTION}]},
            # Thinking off, as in the inference prompt for text answers: the empty thinking block is not trained.
            {"role": "assistant", "content": record["text"], "thinking": ""},
        ]
        tts = [
            {"role": "user", "content": [{"type": "text", "text": f"{TTS_INSTRUCTION}: {record['text']}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": record["text"]}, audio]},
        ]
        for conversation in (asr, tts):
            samples.append(dict(processor.apply_chat_template(conversation, add_generation_prompt=False)))
    return samples


def main(argv=None) -> list[float]:
    """Runs the fine-tuning and returns the loss of every step."""
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = load_model(args)
    # Text tokenizer and audio layout from the model directory, the codec (on the training device) from its own.
    processor = MiMoAudioProcessor.from_pretrained(
        args.model, audio_tokenizer=args.audio_tokenizer, device=args.device
    )
    records = DEFAULT_DATA
    if args.data:
        records = [
            json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    samples = build_samples(processor, records)
    collator = MiMoAudioDataCollator(processor.tokenizer, model.config.audio_empty_ids, padding_side="right")
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    model.train()
    losses = []
    for step in range(args.steps):
        batch = collator(random.sample(samples, min(args.batch_size, len(samples))))
        batch = {key: value.to(args.device) for key, value in batch.items()}
        outputs = model(**batch)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(outputs.loss.item())
        audio_loss = "-" if outputs.audio_loss is None else f"{outputs.audio_loss.sum().item():.3f}"
        print(f"step {step:4d}  loss {losses[-1]:.4f}  text {outputs.text_loss.item():.4f}  audio(sum) {audio_loss}")
    if args.output_dir:
        model.save_pretrained(args.output_dir)
        print(f"LoRA adapter saved to {args.output_dir}")
    return losses


if __name__ == "__main__":
    main()
