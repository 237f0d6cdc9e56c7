"""TRL's `GRPOTrainer` for MiMo-Audio: prompts with speech, completions with text or speech.

TRL's trainers carry text only: they generate with `input_ids` / `attention_mask`, slice `generate`'s output as a
tensor, and score the text tokens with a fused LM head. [`MiMoAudioGRPOTrainer`] keeps everything else of TRL (the
sampler that repeats each prompt `num_generations` times across processes, the group-normalised advantages, the GRPO
/ DAPO / Dr. GRPO losses, the KL penalty against the adapter-free model, logging, checkpoints) and replaces the three
places where the audio channel is needed:

1. prompts are chat messages with audio items, laid out by [`MiMoAudioProcessor.apply_chat_template`] into
   `input_ids` and `audio_input_ids` (`_tokenize_prompts`);
2. each process generates its whole rollout batch in one batched `generate(..., return_dict_in_generate=True)` call and
   keeps `audio_sequences` next to `sequences` (`_generate_single_turn`); completions that contain speech are decoded to
   waveforms for the reward functions (`_generate`);
3. the log-probabilities TRL's loss uses are [`compute_logprobs`] on the prompt + completion with its audio channel:
   per LLM position, the text token's log-probability plus the sum of the log-probabilities of the position's
   `group_size x audio_channels` codes (0 at text positions), i.e. the log-probability of everything sampled at that
   step (`_get_per_token_logps_and_entropies`). The audio channel of the batch being scored travels with TRL's own
   batch dict (`audio_input_ids`, shuffled and split with the other tensors).

Checked against TRL 1.16.0, whose private methods these are; `trl>=1.16` is the `[rl]` extra's bound.
"""

from collections.abc import Callable

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

from .modeling_mimo_audio import compute_logprobs
from .processing_mimo_audio import MiMoAudioProcessor


def _without_none(messages: list[dict]) -> list[dict]:
    """Drops the `None` fields that a `datasets.Dataset` adds to unify message and content-item structs."""
    cleaned = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [
                {key: value for key, value in item.items() if value is not None} for item in message["content"]
            ]
        cleaned.append(message)
    return cleaned


class MiMoAudioGRPOTrainer(GRPOTrainer):
    r"""
    [`trl.GRPOTrainer`] for MiMo-Audio: speech in the prompts, text or speech in the completions.

    Dataset rows hold `"prompt"`: the chat messages of the prompt (Transformers' format; audio items
    `{"type": "audio", "path" | "url" | "audio" | "audio_codes": ...}`, see [`MiMoAudioProcessor.apply_chat_template`]).
    Every other column is passed to the reward functions by name, as in TRL.

    Reward functions are TRL's: `reward_func(prompts, completions, completion_ids, **columns) -> list[float]`, where
    `completions` is the decoded text of each completion (special tokens removed). Besides the dataset columns they
    receive `completion_audio`: the waveform (`torch.FloatTensor` `(samples,)` at `processor.sampling_rate`) of the
    speech each completion generated (between `<|sostm|>` and `<|eostm|>`), or `None` when it has none or the
    processor has no audio tokenizer (or `decode_audio=False`); and `completion_audio_codes`: the generated frames
    `(frames, audio_channels)`.

    Per-token log-probabilities (TRL's `per_token_logps`, `old_per_token_logps`, `ref_per_token_logps`) are per LLM
    position of the completion: `log p(text token) + sum of log p(code)` over the position's audio patch, computed by
    [`compute_logprobs`] with `temperature=args.temperature` and the generation config's `audio_temperature`. TRL's
    `entropy` metric (and `top_entropy_quantile`, the entropy bonus) uses the text channel's entropy.

    Set `args.disable_dropout=True` so that the log-probabilities are those generation sampled from: besides TRL's
    `nn.Dropout` modules, it zeroes the attention dropout of the patch encoder and decoder.

    Sampling: `args.temperature`, `top_p`, `top_k` apply to the text channel; the audio channel's controls go in
    `args.generation_kwargs` (`audio_temperature`, `audio_top_k`, `audio_top_p`). Like TRL, the log-probabilities do
    not model top-k / top-p truncation. Stop ids: `args.generation_kwargs["eos_token_id"]` (e.g.
    `processor.generation_kwargs("asr")["eos_token_id"]`), else the model's generation config.

    Distributed: DDP (`accelerate launch --num_processes N`) and DeepSpeed ZeRO-1/2. Generation is per process and
    data-dependent (each sample chooses text or audio at each step), so FSDP and ZeRO-3, whose sharded forward needs
    every process to run the same modules in step, are refused. `ddp_find_unused_parameters` is set to `False`: the
    patch decoder runs after the DDP wrapper's forward (on no patch when a batch has no audio position), so every
    trainable parameter gets its gradient at every step.

    Args:
        model: a [`MiMoAudioForConditionalGeneration`] (or a PEFT model wrapping one).
        reward_funcs: TRL reward functions (callables; reward models are not supported).
        processor ([`MiMoAudioProcessor`]): lays out the prompts; its audio tokenizer (codec), when it has one,
            encodes audio given as waveforms / paths and decodes the generated speech for the rewards.
        args ([`trl.GRPOConfig`]): TRL's configuration. vLLM, continuous batching, tools and `rollout_func` are not
            supported (they carry text only).
        output_modality (`"text"` or `"audio"`): how the assistant answers (see `apply_chat_template`); `"audio"`
            opens the answer with `<|sostm|>` (TTS, spoken dialogue).
        thinking (`bool`): open the answer with `<think>\n` (see `apply_chat_template`).
        decode_audio (`bool`): decode the generated speech to waveforms for the rewards (needs the processor's codec).
        train_dataset, eval_dataset, callbacks, optimizers, peft_config: as in [`trl.GRPOTrainer`].
    """

    def __init__(
        self,
        model,
        reward_funcs: Callable | list[Callable],
        processor: MiMoAudioProcessor,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        output_modality: str = "text",
        thinking: bool = False,
        decode_audio: bool = True,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if not isinstance(processor, MiMoAudioProcessor):
            raise TypeError(f"`processor` must be a MiMoAudioProcessor, got {type(processor).__name__}.")
        if output_modality not in ("text", "audio"):
            raise ValueError(f"`output_modality` must be 'text' or 'audio', got {output_modality!r}.")
        if args is None:
            args = GRPOConfig("mimo-audio-grpo")
        unsupported = {
            "use_vllm": args.use_vllm,
            "use_transformers_continuous_batching": args.use_transformers_continuous_batching,
        }
        if any(unsupported.values()):
            raise ValueError(
                f"MiMoAudioGRPOTrainer generates with the model's own `generate` (text and audio channels); "
                f"{[key for key, value in unsupported.items() if value]} carry text only."
            )
        if args.ddp_find_unused_parameters:
            raise ValueError(
                "MiMoAudioGRPOTrainer needs `ddp_find_unused_parameters=False`: the patch decoder runs after the DDP "
                "wrapper's forward, which that search would count as unused."
            )
        args.ddp_find_unused_parameters = False  # the Trainer turns it on for PEFT models when left unset
        reward_list = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        if not all(callable(func) and not isinstance(func, (str, torch.nn.Module)) for func in reward_list):
            raise TypeError("MiMoAudioGRPOTrainer takes reward functions (callables), not reward models.")
        self.processor = processor
        self.output_modality = output_modality
        self.thinking = thinking
        self.decode_audio = decode_audio
        # The audio channel `(batch, prompt + completion, group_size, audio_channels)` of the batch being scored.
        self._scored_audio_input_ids = None
        # This process's prompt / completion audio rows, from `_generate_single_turn` to `_generate`.
        self._prompt_audio = self._completion_audio = None
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processor.tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        if self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            raise ValueError(
                "MiMoAudioGRPOTrainer supports DDP and DeepSpeed ZeRO-1/2: MiMo-Audio's generation is data-dependent "
                "per process (text or audio at each step), which sharded forwards (FSDP, ZeRO-3) cannot follow."
            )
        if args.disable_dropout:
            # TRL zeroes the `nn.Dropout` modules; the patch encoder and decoder (attention dropout 0.1 in the released
            # configs) use the attention's dropout probability instead.
            for module in self.model.modules():
                if isinstance(getattr(module, "attention_dropout", None), float):
                    module.attention_dropout = 0.0
        self.generation_config.return_dict_in_generate = True  # `sequences` and `audio_sequences`
        # Truncate completions at the stop ids generation uses (TRL takes them from the model's generation config).
        eos = self.generation_config.eos_token_id
        self.eos_token_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.audio_temperature = float(getattr(self.generation_config, "audio_temperature", 1.0))

    # ------------------------------------------------------------------------------------------------- prompts

    def _tokenize_prompts(self, prompts: list):
        """Lays out the prompts' messages; returns the unpadded `input_ids` lists and `audio_input_ids` tensors."""
        if not all(isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) for prompt in prompts):
            raise ValueError("Each row's `prompt` must be a list of chat messages (dicts with `role` and `content`).")
        inputs = self.processor.apply_chat_template(
            [_without_none(prompt) for prompt in prompts], output_modality=self.output_modality, thinking=self.thinking
        )
        mask = inputs["attention_mask"].bool()
        prompt_ids = [row[keep].tolist() for row, keep in zip(inputs["input_ids"], mask)]
        audio = [row[keep] for row, keep in zip(inputs["audio_input_ids"], mask)]
        return prompt_ids, None, {"audio_input_ids": audio}

    def _pad_audio(self, rows: list[torch.Tensor], padding_side: str) -> torch.Tensor:
        """Pads `(length, group_size, audio_channels)` rows as TRL pads the ids (same side, multiple) with empty ids."""
        empty = torch.tensor(self.processor.audio_empty_ids, dtype=torch.long)
        audio = pad([row.cpu() for row in rows], 0, padding_side, self.pad_to_multiple_of)
        valid = pad(
            [torch.ones(row.shape[0], dtype=torch.bool) for row in rows], 0, padding_side, self.pad_to_multiple_of
        )
        return torch.where(valid[..., None, None], audio, empty)

    # ---------------------------------------------------------------------------------------------- generation

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """One batched `generate` for this process's rollouts; keeps each completion's audio channel."""
        device = self.accelerator.device
        input_ids = pad(
            [torch.tensor(ids) for ids in prompt_ids], self._tokenizer.pad_token_id, "left", self.pad_to_multiple_of
        ).to(device)
        attention_mask = pad(
            [torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], 0, "left", self.pad_to_multiple_of
        ).to(device)
        self._prompt_audio = multimodal_fields["audio_input_ids"]
        audio_input_ids = self._pad_audio(self._prompt_audio, "left").to(device)
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
        ):
            outputs = unwrapped_model.generate(
                input_ids=input_ids,
                audio_input_ids=audio_input_ids,
                attention_mask=attention_mask,
                generation_config=self.generation_config,
            )
        prompt_length = input_ids.shape[1]
        completions = outputs.sequences[:, prompt_length:].cpu()
        completion_audio = outputs.audio_sequences[:, prompt_length:].cpu()
        # Up to and including the first stop id, as TRL does.
        is_stop = torch.isin(completions, torch.tensor(self.eos_token_ids))
        lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, completions.shape[1])
        self._completion_audio = [audio[:length] for audio, length in zip(completion_audio, lengths.tolist())]
        completion_ids = [ids[:length].tolist() for ids, length in zip(completions, lengths.tolist())]
        return completion_ids, None

    def _generate(self, prompts: list):
        """TRL's `_generate`, plus the audio channel of the batch (for scoring) and the generated speech (rewards)."""
        (prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images) = (
            super()._generate(prompts)
        )
        # The prompts' and completions' audio rows, kept by `_generate_single_turn` inside `super()._generate`.
        prompt_audio = self._prompt_audio
        completion_audio = self._completion_audio
        self._prompt_audio = self._completion_audio = None
        self._scored_audio_input_ids = torch.cat(
            [self._pad_audio(prompt_audio, "left"), self._pad_audio(completion_audio, "right")], dim=1
        ).to(self.accelerator.device)

        frames = [
            self.processor._speech_frames(torch.tensor(ids), audio)
            for ids, audio in zip(completion_ids, completion_audio)
        ]
        waveforms = [None] * len(frames)
        if self.decode_audio and self.processor.audio_tokenizer is not None:
            with_speech = [index for index, clip in enumerate(frames) if clip.shape[0]]
            decoded = self.processor.decode_codes([frames[index].T for index in with_speech]) if with_speech else []
            for index, waveform in zip(with_speech, decoded):
                waveforms[index] = waveform
        extra_fields = {**extra_fields, "completion_audio": waveforms, "completion_audio_codes": frames}
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    def _generate_and_score_completions(self, inputs):
        try:
            output = super()._generate_and_score_completions(inputs)
            output["audio_input_ids"] = self._scored_audio_input_ids
        finally:
            self._scored_audio_input_ids = None
        return output

    # -------------------------------------------------------------------------------------------- log-probs

    def _compute_loss(self, model, inputs):
        self._scored_audio_input_ids = inputs["audio_input_ids"]
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._scored_audio_input_ids = None

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_fields,
    ):
        """
        Per-position log-probabilities of the last `logits_to_keep` positions (the completion) with
        [`compute_logprobs`]: text token + the position's audio codes. `input_ids`, `attention_mask`:
        `(batch, prompt + completion)`; the audio channel is the scored batch's `audio_input_ids`
        `(batch, prompt + completion, group_size, audio_channels)`. Returns `(logps, entropies or None, None)`, each
        `(batch, logits_to_keep)`.
        """
        audio_input_ids = self._scored_audio_input_ids
        if audio_input_ids is None or audio_input_ids.shape[:2] != input_ids.shape:
            raise RuntimeError(
                "MiMoAudioGRPOTrainer scores a batch without its audio channel: TRL called the log-probability pass "
                "outside `_generate_and_score_completions` / `_compute_loss` (a TRL version this was not written for?)."
            )
        if any(value is not None for value in multimodal_fields.values()):
            raise ValueError(f"Unexpected image inputs for MiMo-Audio: {sorted(multimodal_fields)}.")
        batch_size = batch_size or input_ids.shape[0]
        logps, entropies = [], []
        for start in range(0, input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                scored = compute_logprobs(
                    model,
                    input_ids[rows],
                    audio_input_ids[rows].to(input_ids.device),
                    attention_mask[rows],
                    temperature=self.temperature,
                    audio_temperature=self.audio_temperature,
                    return_entropy=compute_entropy,
                )
            per_position = scored.text_logprobs + scored.audio_logprobs.sum((-1, -2))
            logps.append(per_position[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(scored.text_entropy[:, -logits_to_keep:])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None


__all__ = ["MiMoAudioGRPOTrainer"]
