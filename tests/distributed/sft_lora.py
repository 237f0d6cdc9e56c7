"""LoRA SFT of the tiny MiMo-Audio model with the Transformers `Trainer` and `MiMoAudioDataCollator`, for comparing a
single process with `accelerate launch --num_processes 2` (DDP, or FSDP2 with the backbone, patch encoder and patch
decoder layers as units). `tests/test_distributed_mimo_audio.py` runs it; by hand:

    accelerate launch --cpu --num_processes 2 tests/distributed/sft_lora.py --output_dir /tmp/ddp
    accelerate launch --cpu --num_processes 2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer \
        --fsdp_state_dict_type FULL_STATE_DICT tests/distributed/sft_lora.py --output_dir /tmp/fsdp2

The dataset is one global batch of `--global_batch` spoken-dialogue samples (user speech in, assistant text + speech
out) with the same layout and different codes, so every process's share has the same number of trained text tokens
and audio patches: the loss is a per-process mean, and its average over processes equals the loss of the global batch
only then (as for any model under data parallelism). Each step is one epoch over the whole set, so the global batch is
the same whatever order the sampler draws. The patch encoder and decoder attention dropout is set to 0, so runs are
deterministic.

Rank 0 writes `results.pt` to `--output_dir`: the loss of each step (`Trainer` averages it over processes), the LoRA
gradients of the first optimizer step (after the all-reduce / reduce-scatter, gathered to full tensors), the LoRA
parameters before the first and after the last step and the text and audio logits of the trained model on the first sample. The adapter is saved to
`--output_dir/adapter` with `Trainer.save_model`.
"""

import argparse
import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from transformers_mimo import (
    MiMoAudioConfig,
    MiMoAudioDataCollator,
    MiMoAudioFeatureExtractor,
    MiMoAudioForConditionalGeneration,
    MiMoAudioProcessor,
    get_lora_target_modules,
)

CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "lm_a" / "checkpoint"


def load_model(checkpoint=CHECKPOINT) -> MiMoAudioForConditionalGeneration:
    """The tiny model with the patch encoder and decoder attention dropout off (deterministic training)."""
    config = MiMoAudioConfig.from_pretrained(checkpoint)
    config.patch_encoder_config.attention_dropout = 0.0
    config.patch_decoder_config.attention_dropout = 0.0
    return MiMoAudioForConditionalGeneration.from_pretrained(checkpoint, config=config)


def lora_model(model):
    return get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=get_lora_target_modules("language_model_and_patch_decoder"),
        ),
    )


def build_dataset(config, tokenizer, size: int, seed: int = 0) -> list[dict]:
    """`size` spoken-dialogue samples (user speech, assistant text + speech), same layout, random codes."""
    processor = MiMoAudioProcessor(
        MiMoAudioFeatureExtractor(),
        tokenizer,
        group_size=config.group_size,
        audio_channels=config.audio_channels,
        audio_empty_ids=config.audio_empty_ids,
    )
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(config.audio_empty_ids)[:, None]  # the empty id is each codebook's size - 1

    def codes(frames):
        return (torch.rand(config.audio_channels, frames, generator=generator) * sizes).long()

    samples = []
    for _ in range(size):
        conversation = [
            {"role": "user", "content": [{"type": "audio", "audio_codes": codes(8)}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "hello world"}, {"type": "audio", "audio_codes": codes(12)}],
            },
        ]
        sample = processor.apply_chat_template(conversation, add_generation_prompt=False)
        samples.append({key: value[0] for key, value in sample.items()})
    return samples


def lora_state(model, attribute=None) -> dict[str, torch.Tensor]:
    """Full (gathered) LoRA parameters, or their `.grad` with `attribute="grad"`, keyed by the PEFT names."""
    state = {}
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            continue
        tensor = parameter if attribute is None else getattr(parameter, attribute)
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[name.removeprefix("module.")] = tensor.detach().clone().cpu()
    return state


class _RecordFirstGradients(TrainerCallback):
    """Keeps the LoRA gradients of the first optimizer step (after DDP's all-reduce / FSDP's reduce-scatter)."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.gradients = lora_state(model, "grad")


def train(
    output_dir: str, steps: int, global_batch: int, gradient_accumulation_steps: int = 1, learning_rate: float = 1e-2
) -> dict:
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    micro_batches = world_size * gradient_accumulation_steps
    if global_batch % micro_batches:
        raise ValueError(f"--global_batch {global_batch} must split into {micro_batches} equal micro-batches.")
    torch.manual_seed(0)
    model = load_model()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    dataset = build_dataset(model.config, tokenizer, global_batch)
    model = lora_model(model)
    initial_parameters = lora_state(model)
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=global_batch // micro_batches,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_train_epochs=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    recorder = _RecordFirstGradients()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids),
        callbacks=[recorder],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    parameters = lora_state(trainer.model_wrapped)
    trainer.save_model(str(Path(output_dir) / "adapter"))

    # Outputs of the trained model on the first sample, computed by every rank (FSDP2 needs all of them in forward).
    batch = MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids)(dataset[:1])
    trainer.model_wrapped.eval()
    with torch.no_grad():
        outputs = trainer.model_wrapped(**batch)
    results = {
        "world_size": world_size,
        "losses": losses,
        "first_gradients": recorder.gradients,
        "initial_parameters": initial_parameters,
        "parameters": parameters,
        "logits": outputs.logits.detach().cpu(),
        "audio_logits": [logits.detach().cpu() for logits in outputs.audio_logits],
    }
    if trainer.accelerator.is_main_process:
        torch.save(results, Path(output_dir) / "results.pt")
    trainer.accelerator.wait_for_everyone()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    args = parser.parse_args(argv)
    return train(args.output_dir, args.steps, args.global_batch, args.gradient_accumulation_steps)


if __name__ == "__main__":
    main()
