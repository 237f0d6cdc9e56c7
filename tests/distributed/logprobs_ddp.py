"""Policy-gradient backward through `compute_logprobs` (text tokens + audio codes, as `MiMoAudioGRPOTrainer` scores)
on a LoRA model (LLM + patch decoder), one process vs DDP over 2 processes (`accelerate launch --multi_gpu
--num_processes 2`, CPU / gloo). The patch decoder runs after the DDP wrapper's forward; process 0's half of the batch
has audio positions, process 1's has none (the patch decoder then runs on a dummy patch), so the check covers both.

Each process's loss is `-mean(advantage * sequence log-probability)` over its 2 rows; one process computes the mean of
the two halves' losses, which DDP's gradient average equals. Rank 0 writes `results.pt` (`--output_dir`): the loss of
each half and the LoRA gradients after the all-reduce. `tests/test_distributed_mimo_audio.py` runs it.
"""

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from sft_lora import load_model, lora_model, lora_state

from transformers_mimo import compute_logprobs


def halves(config):
    """Two halves of 2 rows `(input_ids, audio_input_ids, completion mask, advantages)`: with and without audio."""
    generator = torch.Generator().manual_seed(0)
    empty = torch.tensor(config.audio_empty_ids)
    batches = []
    for with_audio in (True, False):
        input_ids = torch.randint(0, 400, (2, 12), generator=generator)
        audio = empty.expand(2, 12, config.group_size, config.audio_channels).clone()
        if with_audio:
            input_ids[:, 7:10] = config.empty_token_id
            codes = (torch.rand(2, 3, config.group_size, config.audio_channels, generator=generator) * empty).long()
            audio[:, 7:10] = codes
        completion = torch.zeros(2, 12, dtype=torch.bool)
        completion[:, 5:] = True
        batches.append((input_ids, audio, completion, torch.tensor([1.0, -1.0])))
    return batches


def half_loss(model, batch):
    input_ids, audio, completion, advantages = batch
    scored = compute_logprobs(model, input_ids, audio)
    per_position = scored.text_logprobs + scored.audio_logprobs.sum((-1, -2))
    sequence = (per_position * completion).sum(-1) / completion.sum(-1)
    return -(advantages * sequence).mean()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = lora_model(load_model()).eval()
    batches = halves(model.config)
    model = accelerator.prepare(model)
    if accelerator.num_processes == 1:
        losses = [half_loss(model, batch) for batch in batches]
        loss = torch.stack(losses).mean()
    elif accelerator.num_processes == 2:
        loss = half_loss(model, batches[accelerator.process_index])
        losses = accelerator.gather(loss.detach()[None])
    else:
        raise ValueError("Run with 1 or 2 processes.")
    accelerator.backward(loss)
    if accelerator.is_main_process:
        results = {
            "world_size": accelerator.num_processes,
            "losses": torch.stack(list(losses)).detach(),
            "gradients": lora_state(model, "grad"),
        }
        torch.save(results, Path(args.output_dir) / "results.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
