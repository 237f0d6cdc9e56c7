"""LoRA SFT of the tiny MiMo-Audio model with `MiMoAudioDataCollator`, one process against 2 processes on CPU (gloo):
the Transformers `Trainer` in one process and under DDP (`accelerate launch --multi_gpu --num_processes 2`), and
FSDP2 (`--engine fsdp2`: torch's `fully_shard` on every Qwen2 decoder layer, i.e. the backbone, patch encoder and
patch decoder layers, then on the root). `tests/test_distributed_mimo_audio.py` runs it; by hand:

    python tests/distributed/sft_lora.py --output_dir /tmp/single
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/sft_lora.py --output_dir /tmp/ddp
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/sft_lora.py --engine fsdp2 --output_dir /tmp/fsdp2

Why FSDP2 without the `Trainer` here: Accelerate 1.16 turns FSDP on only for accelerator backends; with
`TrainingArguments(use_cpu=True)` the state is MULTI_CPU and `accelerate launch --use_fsdp` silently trains with DDP.
The FSDP2 engine therefore runs the `Trainer`'s update by hand: the model's loss, gradient clipping at the `Trainer`'s
`max_grad_norm` (1.0), AdamW with its defaults and a constant learning rate.

The dataset is one global batch of `--global_batch` spoken-dialogue samples (user speech in, assistant text + speech
out) with the same layout and different codes, so every process's share has the same number of trained text tokens
and audio patches: the loss is a per-process mean, and its average over processes equals the loss of the global batch
only then (as for any model under data parallelism). Each step is one epoch over the whole set, so the global batch is
the same whatever order the sampler draws. The patch encoder and decoder attention dropout is set to 0, so runs are
deterministic.

Rank 0 writes `results.pt` to `--output_dir`: the loss of each step (averaged over processes), the LoRA gradients of
the first optimizer step (after the all-reduce / reduce-scatter and the clipping, gathered to full tensors), the LoRA
parameters before the first and after the last step and the text and audio logits of the trained model on the first
sample. The `Trainer` engines save the adapter to `--output_dir/adapter` (`Trainer.save_model`); the FSDP2 engine
writes a sharded `torch.distributed.checkpoint` of the model's state to `--output_dir/checkpoint` (each process its
shards).
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

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
    """Keeps the LoRA gradients of the first optimizer step (after DDP's all-reduce and the clipping)."""

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


def train_fsdp2(output_dir: str, steps: int, global_batch: int, learning_rate: float = 1e-2) -> dict:
    """The `Trainer`'s update (loss, clipping at 1.0, AdamW, constant learning rate) on a `fully_shard`ed model."""
    torch.set_num_threads(1)
    state = PartialState(cpu=True)  # gloo process group from the launcher's environment
    world_size, rank = state.num_processes, state.process_index
    if global_batch % world_size:
        raise ValueError(f"--global_batch {global_batch} must split into {world_size} equal micro-batches.")
    torch.manual_seed(0)
    model = load_model()
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    dataset = build_dataset(model.config, tokenizer, global_batch)
    collator = MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids)
    model = lora_model(model)
    initial_parameters = lora_state(model)
    units = [module for module in model.modules() if isinstance(module, Qwen2DecoderLayer)]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    share = global_batch // world_size
    batch = collator(dataset[rank * share : (rank + 1) * share])
    losses, first_gradients = [], None
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        if first_gradients is None:
            first_gradients = lora_state(model, "grad")
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world_size)
    parameters = lora_state(model)
    dcp.save(get_model_state_dict(model), checkpoint_id=str(Path(output_dir) / "checkpoint"))

    model.eval()
    with torch.no_grad():
        outputs = model(**collator(dataset[:1]))
    results = {
        "world_size": world_size,
        "units": len(units),
        "losses": losses,
        "first_gradients": first_gradients,
        "initial_parameters": initial_parameters,
        "parameters": parameters,
        "logits": outputs.logits.detach().cpu(),
        "audio_logits": [logits.detach().cpu() for logits in outputs.audio_logits],
    }
    if state.is_main_process:
        torch.save(results, Path(output_dir) / "results.pt")
    state.wait_for_everyone()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--engine", choices=["trainer", "fsdp2"], default="trainer")
    args = parser.parse_args(argv)
    if args.engine == "fsdp2":
        return train_fsdp2(args.output_dir, args.steps, args.global_batch)
    return train(args.output_dir, args.steps, args.global_batch, args.gradient_accumulation_steps)


if __name__ == "__main__":
    main()
