"""TRL's GRPOTrainer on MiMo-Audio (`MiMoAudioGRPOTrainer`): one GRPO step on the tiny model with speech prompts and
with speech completions; the per-token log-probabilities TRL's loss uses equal `compute_logprobs` on the raw `generate`
output; the reward functions get the decoded text and the generated speech's waveform."""

import pytest
import torch
from conftest import GOLDEN
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from trl import GRPOConfig

from transformers_mimo import (
    MiMoAudioForConditionalGeneration,
    MiMoAudioGRPOTrainer,
    MiMoAudioProcessor,
    compute_logprobs,
    get_lora_target_modules,
)


CHECKPOINT = GOLDEN / "lm_a" / "checkpoint"
CODEC = GOLDEN / "tok_a" / "checkpoint"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: one thread is ~10x faster than two on a loaded 2-core host (no goldens compared here).
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def processor():
    return MiMoAudioProcessor.from_pretrained(CHECKPOINT, audio_tokenizer=CODEC)


def _policy():
    base = MiMoAudioForConditionalGeneration.from_pretrained(CHECKPOINT)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=get_lora_target_modules("language_model_and_patch_decoder"))
    return get_peft_model(base, lora)


def _speech_prompts():
    """Two ASR prompts with speech of different lengths (precomputed codes), so the batch is padded."""
    codes = load_file(GOLDEN / "lm_a" / "golden.safetensors")["prompt_audio_codes.asr"].view(-1, 8).T
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio_codes": codes[:, :frames]},
                    {"type": "text", "text": "transcribe"},
                ],
            }
        ]
        for frames in (8, 14)
    ]


class _RecordingTrainer(MiMoAudioGRPOTrainer):
    """Records what TRL's loss scores: ids, masks, audio channel and the per-token log-probabilities."""

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        output = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs)
        self.scored.append(
            {
                "input_ids": input_ids.clone(),
                "attention_mask": attention_mask.clone(),
                "audio_input_ids": self._scored_audio_input_ids.clone(),
                "logits_to_keep": logits_to_keep,
                "logps": output[0].detach().clone(),
            }
        )
        return output


def _record_generate(policy, stop_ids):
    """Wraps `policy.generate`: keeps each call's output and `compute_logprobs` on it (same weights, same masks)."""
    original, rollouts = policy.generate, []

    def generate(**kwargs):
        out = original(**kwargs)
        prompt_length = kwargs["input_ids"].shape[1]
        new = out.sequences[:, prompt_length:]
        is_stop = torch.isin(new, torch.tensor(stop_ids))
        in_completion = ((is_stop.cumsum(-1) - is_stop.long()) == 0).long()
        mask = torch.cat([kwargs["attention_mask"], in_completion], 1)
        with torch.no_grad():
            scored = compute_logprobs(policy, out.sequences, out.audio_sequences, mask)
        per_position = scored.text_logprobs + scored.audio_logprobs.sum((-1, -2))
        audio_part = scored.audio_logprobs.sum((-1, -2))
        rollouts.append((out.sequences, out.audio_sequences, mask, prompt_length, per_position, audio_part))
        return out

    policy.generate = generate
    return rollouts


def _train_one_step(processor, prompts, output_modality, tmp_path, rewards_seen, **extra_generation):
    policy = _policy()
    stop_ids = [processor.tokenizer.eos_token_id, processor.im_end_token_id, processor.eostm_token_id]
    rollouts = _record_generate(policy, stop_ids)

    def reward(prompts, completions, completion_ids, completion_audio, completion_audio_codes, **kwargs):
        rewards_seen.append(
            {
                "completions": completions,
                "audio": completion_audio,
                "codes": completion_audio_codes,
                "ids": completion_ids,
            }
        )
        # Longer speech is better (rows without speech: 0), and longer text as a tie-breaker: varies within groups.
        return [
            (0.0 if audio is None else audio.shape[-1] / 24000) + 0.01 * len(ids)
            for audio, ids in zip(completion_audio, completion_ids)
        ]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=10,
        max_steps=1,
        learning_rate=5e-3,
        beta=0.04,  # exercises the reference pass (adapter disabled)
        disable_dropout=True,
        bf16=False,  # TRL's default autocasts the scoring to bf16, also on CPU; fp32 here for exact comparisons
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        generation_kwargs={"eos_token_id": stop_ids, **extra_generation},
    )
    trainer = _RecordingTrainer(
        policy,
        reward,
        processor,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": prompt} for prompt in prompts]),
        output_modality=output_modality,
    )
    trainer.scored = []
    before = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    trainer.train()
    moved = max((p.detach() - before[name]).abs().max() for name, p in policy.named_parameters() if p.requires_grad)
    return trainer, rollouts, moved


def _assert_trl_logps_equal_compute_logprobs(trainer, rollouts):
    """Each row TRL scored (after its re-padding, shuffling and splitting) is matched to its `generate` row by its
    prompt and completion ids; per completion position, TRL's log-probability equals the text + audio
    `compute_logprobs` of that position (fp32; different padding and batch order only: 1e-5 absolute + 1e-6 relative,
    as an audio position sums 32 code log-probabilities, about -85 on the tiny model)."""
    assert len(rollouts) == 1, "one batched generate call per step"
    sequences, audio_sequences, masks, prompt_length, expected, _ = rollouts[0]
    # The policy pass (with entropy) and the reference pass (adapter disabled, beta > 0) both score the batch.
    policy_pass = trainer.scored[-1]
    keep = policy_pass["logits_to_keep"]
    matched = 0
    for row in range(policy_pass["input_ids"].shape[0]):
        ids, mask = policy_pass["input_ids"][row], policy_pass["attention_mask"][row].bool()
        prompt = ids[:-keep][mask[:-keep]]
        completion = ids[-keep:][mask[-keep:]]
        length = completion.shape[0]
        for candidate in range(sequences.shape[0]):
            candidate_prompt = sequences[candidate, :prompt_length][masks[candidate, :prompt_length].bool()]
            candidate_completion = sequences[candidate, prompt_length : prompt_length + length]
            if torch.equal(candidate_prompt, prompt) and torch.equal(candidate_completion, completion):
                break
        else:
            raise AssertionError(f"row {row}: no generated sequence has its prompt and completion")
        assert masks[candidate, prompt_length:].sum() == length
        # The audio channel TRL scored is the one generate produced (prompt speech and completion patches).
        audio = policy_pass["audio_input_ids"][row]
        assert torch.equal(
            audio[:-keep][mask[:-keep]],
            audio_sequences[candidate, :prompt_length][masks[candidate, :prompt_length].bool()],
        )
        assert torch.equal(audio[-keep:][:length], audio_sequences[candidate, prompt_length : prompt_length + length])
        torch.testing.assert_close(
            policy_pass["logps"][row, :length],
            expected[candidate, prompt_length : prompt_length + length],
            rtol=1e-6,
            atol=1e-5,
        )
        assert (policy_pass["logps"][row, length:] == 0).all()
        matched += 1
    assert matched == sequences.shape[0] == 8


def test_grpo_step_with_speech_prompts(processor, tmp_path):
    """ASR-style: speech in the prompt, text out. One GRPO step (LoRA, KL to the adapter-free model): TRL's
    per-token log-probabilities equal `compute_logprobs`, the prompts' speech reaches generation and scoring, the
    rewards get the decoded text, and the LoRA weights move."""
    rewards_seen = []
    trainer, rollouts, moved = _train_one_step(processor, _speech_prompts(), "text", tmp_path, rewards_seen)
    _assert_trl_logps_equal_compute_logprobs(trainer, rollouts)
    _, audio_sequences, _, prompt_length, _, _ = rollouts[0]
    empty = torch.tensor(processor.audio_empty_ids)
    prompt_speech = (audio_sequences[:, :prompt_length] != empty).any(-1).any(-1).sum(-1)
    assert (prompt_speech >= 2).all()  # every prompt carries its speech patches into generate
    completions = rewards_seen[0]["completions"]
    assert len(completions) == 8 and all(c[0]["role"] == "assistant" for c in completions)
    expected_text = processor.tokenizer.batch_decode(rewards_seen[0]["ids"], skip_special_tokens=True)
    assert [c[0]["content"] for c in completions] == expected_text
    assert moved > 1e-4
    log = trainer.state.log_history[0]
    assert log["reward_std"] > 0 and "kl" in log and torch.isfinite(torch.tensor(log["loss"]))


def test_grpo_step_with_speech_completions(processor, tmp_path):
    """TTS-style: text prompt, answer opened with `<|sostm|>`; a bias on `<|empty|>` makes the random tiny model emit
    audio patches. TRL's per-token log-probabilities include the audio codes (they equal text + audio
    `compute_logprobs` per position, and differ from the text alone at audio positions); the reward functions get
    each completion's speech decoded by the codec (equal to decoding its frames alone, 1e-6)."""
    prompts = [[{"role": "user", "content": f"Please convert this text to speech: {text}"}] for text in ("hi", "ok")]
    rewards_seen = []
    empty_bias = {"sequence_bias": {(processor.empty_token_id,): 4.0}}
    trainer, rollouts, moved = _train_one_step(processor, prompts, "audio", tmp_path, rewards_seen, **empty_bias)
    _assert_trl_logps_equal_compute_logprobs(trainer, rollouts)
    sequences, _, masks, prompt_length, _, audio_part = rollouts[0]
    assert (sequences[:, prompt_length - 1] == processor.sostm_token_id).all()
    completion_audio = (sequences[:, prompt_length:] == processor.empty_token_id) & masks[:, prompt_length:].bool()
    assert completion_audio.sum() >= 8
    # At those positions the scored value carries the 32 codes' log-probabilities (the codebooks have 17-65 codes).
    assert (audio_part[:, prompt_length:][completion_audio] < -32 * 2.0).all()
    assert (audio_part[:, prompt_length:][~completion_audio] == 0).all()
    seen = rewards_seen[0]
    with_speech = [index for index, audio in enumerate(seen["audio"]) if audio is not None]
    assert len(with_speech) >= 2
    for index in with_speech:
        frames = seen["codes"][index]
        assert frames.shape[1] == processor.audio_channels and frames.shape[0] > 0
        # Decoded in one batch with the other completions: padding noise only.
        torch.testing.assert_close(seen["audio"][index], processor.decode_codes([frames.T])[0], rtol=0, atol=1e-6)
    assert moved > 1e-4


def test_trainer_rejects_unsupported_setups(processor, tmp_path):
    policy = _policy()
    dataset = Dataset.from_list([{"prompt": prompt} for prompt in _speech_prompts()])
    args = GRPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, num_generations=2, per_device_train_batch_size=2
    )
    with pytest.raises(TypeError, match="MiMoAudioProcessor"):
        MiMoAudioGRPOTrainer(policy, lambda **kw: [0.0], processor.tokenizer, args=args, train_dataset=dataset)
    with pytest.raises(ValueError, match="output_modality"):
        MiMoAudioGRPOTrainer(
            policy, lambda **kw: [0.0], processor, args=args, train_dataset=dataset, output_modality="speech"
        )
    with pytest.raises(TypeError, match="reward functions"):
        MiMoAudioGRPOTrainer(policy, "some/reward-model", processor, args=args, train_dataset=dataset)


@pytest.mark.parametrize(
    "example, extra",
    [("grpo_asr.py", []), ("grpo_tts.py", ["--empty_token_bias", "4"])],
)
def test_examples_run_with_two_processes(example, extra, tmp_path):
    """examples/grpo_asr.py and examples/grpo_tts.py as written, on the tiny model and codec, with `accelerate launch`
    and 2 CPU processes (DDP): 2 GRPO steps, rewards logged, the adapter saved. The TTS run's mean reward is above the
    no-speech value (-1.5 s for both default texts), i.e. the completions hold speech the codec decoded."""
    import os
    import re
    import socket
    import subprocess
    import sys

    repo = CHECKPOINT.parents[4]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(port),
        str(repo / "examples" / example),
        "--model",
        str(CHECKPOINT),
        "--audio_tokenizer",
        str(CODEC),
        "--use_cpu",
        "--output_dir",
        str(tmp_path),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src")}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rewards = [float(value) for value in re.findall(r"step \d+: reward (-?[\d.]+)", done.stdout)]
    assert len(rewards) == 2, done.stdout[-3000:]
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    if example == "grpo_tts.py":
        assert sum(rewards) / 2 > -1.5 + 0.1


def test_compute_logprobs_text_entropy_and_missing_audio():
    """`return_entropy=True` (TRL's `entropy` metric): entry t is the entropy of the text distribution position t was
    drawn from, computed here from the model's logits (1e-5); 0 at t = 0 and at padding. Audio positions without
    `audio_input_ids` are refused."""
    model = MiMoAudioForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    input_ids = torch.tensor([[400, 401, 11, 23, 57, 402], [401, 64, 82, 198, 401, 5]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        scored = compute_logprobs(
            model, input_ids, attention_mask=attention_mask, temperature=0.7, return_entropy=True
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1] / 0.7
    probabilities = logits.softmax(-1)
    expected = -(probabilities * probabilities.log()).sum(-1)
    torch.testing.assert_close(
        scored.text_entropy[:, 1:][attention_mask[:, 1:].bool()],
        expected[attention_mask[:, 1:].bool()],
        rtol=0,
        atol=1e-5,
    )
    assert scored.text_entropy[0, 0] == 0 and scored.text_entropy[1, 0] == 0 and (scored.text_entropy[1, 1:] > 0).all()
    assert compute_logprobs(model, input_ids).text_entropy is None
    with pytest.raises(ValueError, match="audio_input_ids"):
        compute_logprobs(model, torch.tensor([[401, model.config.empty_token_id, 5]]))
