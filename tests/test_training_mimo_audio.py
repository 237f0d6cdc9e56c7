"""Training data path and RL log-probabilities: MiMoAudioDataCollator masking, compute_logprobs against generation
(exact scores, sampling frequencies, the model's own loss) and the LoRA fine-tuning example."""

import importlib.util
import json
import math

import pytest
import torch
from conftest import GOLDEN
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from transformers_mimo import (
    MiMoAudioDataCollator,
    MiMoAudioFeatureExtractor,
    MiMoAudioForConditionalGeneration,
    MiMoAudioProcessor,
    compute_logprobs,
)


CHECKPOINT = GOLDEN / "lm_a" / "checkpoint"
REPO = GOLDEN.parents[2]


@pytest.fixture(scope="module")
def model():
    return MiMoAudioForConditionalGeneration.from_pretrained(CHECKPOINT).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def processor(tokenizer, model):
    config = model.config
    return MiMoAudioProcessor(
        MiMoAudioFeatureExtractor(),
        tokenizer,
        group_size=config.group_size,
        audio_channels=config.audio_channels,
        audio_empty_ids=config.audio_empty_ids,
    )


def _golden_codes(name, channels=8):
    """Golden prompt codes of lm_a (flattened frame-major) as `(channels, frames)`."""
    return load_file(GOLDEN / "lm_a" / "golden.safetensors")[f"prompt_audio_codes.{name}"].view(-1, channels).T


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------- collator


def test_collator_masks_everything_but_the_assistant_reply(tokenizer, processor, model):
    """ASR-style sample built by the processor, thinking off (`"thinking": ""`, the empty block the inference prompt
    has): system, user (with its audio), the assistant header and the empty thinking block are -100 on every
    channel; the reply and `<|im_end|>\n` are trained. With a reasoning (thinking on), the thinking block is
    trained."""
    codes = _golden_codes("asr")
    user = {
        "role": "user",
        "content": [{"type": "audio", "audio_codes": codes}, {"type": "text", "text": "transcribe"}],
    }
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        user,
        {"role": "assistant", "content": "hello world", "thinking": ""},
    ]
    sample = processor.apply_chat_template(conversation, add_generation_prompt=False)
    ids = sample["input_ids"][0]
    reply = _ids(tokenizer, "hello world") + _ids(tokenizer, "<|im_end|>\n")
    prefix_len = ids.shape[0] - len(reply)
    assert ids[prefix_len:].tolist() == reply
    # The header and the thinking block sit right before the reply, as in the generation prompt.
    opening = _ids(tokenizer, "<|im_start|>assistant\n") + _ids(tokenizer, "<think>\n\n</think>\n")
    assert ids[prefix_len - len(opening) : prefix_len].tolist() == opening

    collator = MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids)
    batch = collator([sample])
    labels, audio_labels = batch["labels"][0], batch["audio_labels"][0]
    expected = torch.full_like(ids, -100)
    expected[prefix_len:] = ids[prefix_len:]
    assert torch.equal(labels, expected)
    assert (audio_labels[:prefix_len] == -100).all()
    assert torch.equal(audio_labels[prefix_len:], sample["audio_input_ids"][0, prefix_len:])
    # The user's audio is in the inputs, untouched.
    assert (ids == model.config.empty_token_id).sum() == math.ceil(codes.shape[1] / model.config.group_size)
    assert torch.equal(batch["input_ids"][0], ids) and torch.equal(batch["audio_input_ids"], sample["audio_input_ids"])

    thinking = processor.apply_chat_template(
        [user, {"role": "assistant", "content": "hello world", "thinking": "it is english"}],
        add_generation_prompt=False,
    )
    trained = _ids(tokenizer, "<think>\n") + _ids(tokenizer, "it is english") + _ids(tokenizer, "</think>\n") + reply
    thinking_labels = collator([thinking])["labels"][0]
    assert thinking_labels[thinking_labels != -100].tolist() == trained
    assert (thinking_labels[: thinking["input_ids"].shape[1] - len(trained)] == -100).all()


def test_collator_trains_assistant_speech_and_pads_both_sides(tokenizer, processor, model):
    """TTS-style sample (speech answer) + a multi-turn text sample, padded right and left: the assistant speech
    stream (`<|sostm|>` ... `<|eostm|>`) is trained with its codes, every assistant turn is trained, and the padding
    side only moves the rows."""
    codes = _golden_codes("icl_out")
    config = model.config
    tts = [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}, {"type": "audio", "audio_codes": codes}]},
    ]
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    tts_sample = processor.apply_chat_template(tts, add_generation_prompt=False)
    chat_sample = processor.apply_chat_template(chat, add_generation_prompt=False)
    header = _ids(tokenizer, "<|im_start|>assistant\n")

    right = MiMoAudioDataCollator(tokenizer, config.audio_empty_ids)([tts_sample, chat_sample])
    left = MiMoAudioDataCollator(tokenizer, config.audio_empty_ids, padding_side="left")([tts_sample, chat_sample])
    tts_len, chat_len = tts_sample["input_ids"].shape[1], chat_sample["input_ids"].shape[1]
    length = max(tts_len, chat_len)
    assert tts_len != chat_len
    assert right["input_ids"].shape == left["input_ids"].shape == (2, length)

    # TTS row: everything from <|sostm|> on is trained; the audio labels are the codes at the patch positions.
    ids = tts_sample["input_ids"][0]
    start = ids.tolist().index(config.sostm_token_id)
    assert ids[start - len(header) : start].tolist() == header
    expected = torch.full_like(ids, -100)
    expected[start:] = ids[start:]
    assert torch.equal(right["labels"][0, :tts_len], expected)
    patches = ids == config.empty_token_id
    assert patches.sum() == math.ceil(codes.shape[1] / config.group_size)
    frames = right["audio_labels"][0, :tts_len][patches].reshape(-1, config.audio_channels).T
    assert torch.equal(frames[:, : codes.shape[1]], codes)
    assert (right["audio_labels"][0][:start] == -100).all()

    # Chat row: both assistant replies "b<|im_end|>\n" and "d<|im_end|>\n" are trained, nothing else.
    chat_ids = chat_sample["input_ids"][0].tolist()
    trained = [token for token, label in zip(chat_ids, right["labels"][1][:chat_len].tolist()) if label != -100]
    turn_end = _ids(tokenizer, "<|im_end|>\n")
    assert trained == _ids(tokenizer, "b") + turn_end + _ids(tokenizer, "d") + turn_end
    for row, row_len in ((0, tts_len), (1, chat_len)):
        assert right["attention_mask"][row].tolist() == [1] * row_len + [0] * (length - row_len)
        assert (right["labels"][row, row_len:] == -100).all() and (right["audio_labels"][row, row_len:] == -100).all()
        assert (right["input_ids"][row, row_len:] == tokenizer.pad_token_id).all()
        assert (right["audio_input_ids"][row, row_len:] == torch.tensor(config.audio_empty_ids)).all()
        # Left padding holds the same rows, shifted.
        for key in ("input_ids", "audio_input_ids", "labels", "audio_labels", "attention_mask"):
            assert torch.equal(left[key][row, length - row_len :], right[key][row, :row_len])
    # Same loss with either side (positions come from the attention mask).
    with torch.no_grad():
        loss_right = model(**right).loss
        loss_left = model(**left).loss
    torch.testing.assert_close(loss_left, loss_right, rtol=1e-5, atol=1e-5)  # fp32, different padding only


def test_collator_accepts_padded_processor_batches(tokenizer, processor, model):
    """A left-padded processor batch `(B, T)` is unpadded and re-collated; rows equal the samples collated alone."""
    chats = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bb"}],
        [{"role": "user", "content": "long question"}, {"role": "assistant", "content": "d"}],
    ]
    collator = MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids)
    batched = collator([processor.apply_chat_template(chats, add_generation_prompt=False)])
    for row, chat in enumerate(chats):
        alone = collator([processor.apply_chat_template(chat, add_generation_prompt=False)])
        length = alone["input_ids"].shape[1]
        for key in alone:
            assert torch.equal(batched[key][row, :length], alone[key][0])
    padded = MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids, pad_to_multiple_of=8)(
        [processor.apply_chat_template(chats, add_generation_prompt=False)]
    )
    length = batched["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == -(-length // 8) * 8 > length
    assert (
        torch.equal(padded["labels"][:, :length], batched["labels"]) and (padded["labels"][:, length:] == -100).all()
    )
    assert (padded["attention_mask"][:, length:] == 0).all()


def test_collator_rejects_bad_samples(tokenizer, processor, model):
    collator = MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids)
    prompt_only = processor.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=False)
    with pytest.raises(ValueError, match="no `<\\|im_start\\|>assistant"):
        collator([prompt_only])
    sample = processor.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], add_generation_prompt=False
    )
    with pytest.raises(ValueError, match="channels"):
        collator([{"input_ids": sample["input_ids"], "audio_input_ids": sample["audio_input_ids"][..., :3]}])
    with pytest.raises(ValueError, match="needs `input_ids` and `audio_input_ids`"):
        collator([{"input_ids": sample["input_ids"]}])
    with pytest.raises(ValueError, match="padding_side"):
        MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids, padding_side="middle")


# ---------------------------------------------------------------------------------------------- log-probabilities


def _prompts(model):
    """Two left-padded prompts; the second has an audio segment (golden codes)."""
    config = model.config
    codes = _golden_codes("asr")[:, :8].T.reshape(2, config.group_size, config.audio_channels)
    input_ids = torch.tensor(
        [
            [400, 400, 400, 401, 10, 20, 30],
            [401, 11, config.sosp_token_id, config.empty_token_id, config.empty_token_id, config.eosp_token_id, 15],
        ]
    )
    attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    audio = torch.tensor(config.audio_empty_ids).expand(2, 7, config.group_size, config.audio_channels).clone()
    audio[1, 3:5] = codes
    return input_ids, audio, attention_mask


def test_logprobs_equal_generation_scores(model):
    """Sampled continuation (temperature 1, no top-k/top-p): compute_logprobs on the output equals the log-softmax of
    the logits generate sampled from, per text token and per audio code (empty ids banned), to 1e-5 (fp32; one
    teacher-forced pass vs the cached step-by-step loop)."""
    input_ids, audio, attention_mask = _prompts(model)
    config = model.config
    torch.manual_seed(3)
    new = 12
    out = model.generate(
        input_ids,
        audio_input_ids=audio,
        attention_mask=attention_mask,
        max_new_tokens=new,
        do_sample=True,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    sequences, audio_sequences = out.sequences, out.audio_sequences
    prompt = input_ids.shape[1]
    assert sequences.shape == (2, prompt + new)
    mask = torch.cat([attention_mask, torch.ones(2, new, dtype=torch.long)], 1)
    with torch.no_grad():
        logprobs = compute_logprobs(model, sequences, audio_sequences, mask)

    audio_steps = 0
    for step in range(new):
        position = prompt + step
        token = sequences[:, position]
        expected_text = out.logits[step].log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs.text_logprobs[:, position], expected_text, rtol=0, atol=1e-5)
        is_audio = token == config.empty_token_id
        assert torch.equal(logprobs.audio_mask[:, position], is_audio)
        for channel, empty_id in enumerate(config.audio_empty_ids):
            scores = out.audio_logits[step][channel].clone()
            scores[..., empty_id] = float("-inf")
            expected = scores.log_softmax(-1).gather(-1, audio_sequences[:, position, :, channel, None]).squeeze(-1)
            got = logprobs.audio_logprobs[:, position, :, channel]
            torch.testing.assert_close(got[is_audio], expected[is_audio], rtol=0, atol=1e-5)
            assert (got[~is_audio] == 0).all()
        audio_steps += int(is_audio.sum())
    assert audio_steps >= 2, "the sampled continuation should contain audio patches"
    assert (logprobs.text_logprobs[mask == 0] == 0).all() and (logprobs.text_logprobs[:, 0] == 0).all()
    # The prompt's own audio patches (row 1, positions 3-4) are scored too, finite (no empty id there).
    assert logprobs.audio_mask[1, 3:5].all() and torch.isfinite(logprobs.audio_logprobs[1, 3:5]).all()


def test_summed_text_logprobs_equal_the_model_loss(model):
    """Independent path: on a text-only sequence with no `<|empty|>` target, the model's text loss is the mean
    next-token cross-entropy, so `-text_loss * count` equals the summed log-probabilities (fp32, 1e-5 relative)."""
    input_ids = torch.tensor([[401, 5, 9, 33, 120, 250, 7, 402, 198, 60]])
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=input_ids).text_loss
        logprobs = compute_logprobs(model, input_ids)
    count = input_ids.shape[1] - 1
    torch.testing.assert_close(logprobs.text_logprobs.sum(), -loss * count, rtol=1e-5, atol=0)
    assert logprobs.text_logprobs[0, 0] == 0 and (logprobs.text_logprobs[0, 1:] < 0).all()
    assert not logprobs.audio_mask.any() and (logprobs.audio_logprobs == 0).all()
    # The model method is the same computation.
    with torch.no_grad():
        method = model.compute_logprobs(input_ids)
    torch.testing.assert_close(method.text_logprobs, logprobs.text_logprobs, rtol=0, atol=0)


class _ForceToken(LogitsProcessor):
    def __init__(self, token_id):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced


def _within_sampling_error(frequencies, probabilities, samples):
    """|freq - p| <= 5 sigma per value, sigma = sqrt(max(p, 1/N) (1 - p) / N) (binomial; 1/N floor for rare values)."""
    sigma = (probabilities.clamp(min=1.0 / samples) * (1 - probabilities) / samples).sqrt()
    return ((frequencies - probabilities).abs() <= 5 * sigma).all()


def test_sampling_frequencies_match_logprobs(model):
    """Sample N = 4000 continuations of one prompt (temperature 1, no top-k/top-p) and compare the empirical
    frequencies with exp(compute_logprobs): the first text token over the whole vocabulary; the first frame of
    codebook 0 (patch decoder step 0); and the first frame of codebook 1, predicted at step `delay_pattern[1]` after
    codebook 0's first code, whose marginal is the sum over that code of the teacher-forced joint probability. Each
    value must lie within 5 binomial sigmas (fixed seed)."""
    config = model.config
    prompt = torch.tensor([[401, 11, 23, 57, 402, 198, 401, 64]])
    samples = 4000
    batch = prompt.expand(samples, -1)
    sampling = {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": None,
        "top_p": 1.0,
        "max_new_tokens": 1,
        "eos_token_id": None,
    }

    torch.manual_seed(0)
    first = model.generate(batch, **sampling).sequences[:, -1]
    vocab = config.text_config.vocab_size
    candidates = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
    empty_audio = torch.tensor(config.audio_empty_ids).expand(*candidates.shape, config.group_size, -1)
    with torch.no_grad():
        text_probs = compute_logprobs(model, candidates, empty_audio).text_logprobs[:, -1].exp()
    torch.testing.assert_close(text_probs.sum(), torch.tensor(1.0), rtol=0, atol=1e-5)
    frequencies = torch.bincount(first, minlength=vocab).float() / samples
    assert _within_sampling_error(frequencies, text_probs, samples)

    # Audio: force the text token to <|empty|> so every sample draws a patch from the same hidden state.
    torch.manual_seed(1)
    out = model.generate(batch, logits_processor=LogitsProcessorList([_ForceToken(config.empty_token_id)]), **sampling)
    patches = out.audio_sequences[:, -1]  # (samples, group_size, audio_channels)
    assert (out.sequences[:, -1] == config.empty_token_id).all()
    size0, size1 = config.audio_vocab_sizes[:2]
    # Teacher-forced joint of (codebook 0 frame 0, codebook 1 frame 0) over every pair of codes.
    code0, code1 = torch.meshgrid(torch.arange(size0), torch.arange(size1), indexing="ij")
    pairs = code0.numel()
    patch = torch.zeros(pairs, config.group_size, config.audio_channels, dtype=torch.long)
    patch[:, 0, 0], patch[:, 0, 1] = code0.flatten(), code1.flatten()
    input_ids = torch.cat([prompt.expand(pairs, -1), torch.full((pairs, 1), config.empty_token_id)], 1)
    audio = torch.tensor(config.audio_empty_ids).expand(pairs, input_ids.shape[1], config.group_size, -1).clone()
    audio[:, -1] = patch
    with torch.no_grad():
        audio_logprobs = compute_logprobs(model, input_ids, audio).audio_logprobs[:, -1, 0]
    joint = (audio_logprobs[:, 0] + audio_logprobs[:, 1]).exp().view(size0, size1)
    torch.testing.assert_close(joint.sum(), torch.tensor(1.0), rtol=0, atol=1e-5)
    empty0, empty1 = config.audio_empty_ids[:2]
    assert joint[empty0].sum() == 0 and joint[:, empty1].sum() == 0  # empty ids are banned
    for channel, marginal in ((0, joint.sum(1)), (1, joint.sum(0))):
        frequencies = torch.bincount(patches[:, 0, channel], minlength=marginal.numel()).float() / samples
        assert _within_sampling_error(frequencies, marginal, samples), f"codebook {channel}"
    # The check has power: codebook 1's marginal is far from its distribution given any single codebook-0 code.
    frequencies = torch.bincount(patches[:, 0, 1], minlength=size1).float() / samples
    conditional = joint[patches[:, 0, 0].mode().values]
    assert not _within_sampling_error(frequencies, conditional / conditional.sum(), samples)


def test_compute_logprobs_rejects_bad_input(model):
    with pytest.raises(ValueError, match="Temperatures must be positive"):
        compute_logprobs(model, torch.tensor([[1, 2]]), temperature=0.0)
    with pytest.raises(ValueError, match="batch_size, seq_len"):
        compute_logprobs(model, torch.tensor([1, 2]))


def test_grpo_step_with_lora_raises_the_rewarded_completions(model):
    """The GRPO-style loop of docs/training.md (generate -> reward -> group-normalised advantages -> log-probabilities
    -> clipped policy loss -> step) on a LoRA policy: one step lowers the loss on the same completions, i.e. raises
    the log-probability of the above-average ones relative to the others. Reward: audio patches per completion."""
    from peft import LoraConfig, get_peft_model

    from transformers_mimo import get_lora_target_modules

    config = model.config
    base = MiMoAudioForConditionalGeneration.from_pretrained(CHECKPOINT).eval()
    policy = get_peft_model(
        base, LoraConfig(r=4, target_modules=get_lora_target_modules("language_model_and_patch_decoder"))
    )
    policy.eval()  # no dropout: log-probabilities match the sampling distribution; gradients still flow
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-3)
    prompt = torch.tensor([[401, 11, 23, 57, 402, 198, 401, 64]]).expand(8, -1)
    prompt_length, new = prompt.shape[1], 6

    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.generate(
            input_ids=prompt,
            max_new_tokens=new,
            do_sample=True,
            temperature=1.0,
            top_k=None,
            top_p=1.0,
            eos_token_id=None,
        )
    completion = torch.zeros_like(out.sequences, dtype=torch.bool)
    completion[:, prompt_length:] = True
    rewards = (out.sequences[:, prompt_length:] == config.empty_token_id).float().sum(-1)
    assert rewards.std() > 0
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)

    def sequence_logprobs():
        logprobs = compute_logprobs(policy, out.sequences, out.audio_sequences)
        per_position = logprobs.text_logprobs + logprobs.audio_logprobs.sum((-1, -2))
        return (per_position * completion).sum(-1) / completion.sum(-1)

    with torch.no_grad():
        old = sequence_logprobs()

    def policy_loss():
        ratio = (sequence_logprobs() - old).exp()
        return -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean()

    loss = policy_loss()
    assert torch.isclose(loss, torch.tensor(0.0), atol=1e-6)  # on-policy: ratio 1, advantages sum to 0
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        assert policy_loss() < -1e-3
        moved = sequence_logprobs() - old
    assert (advantages * moved).sum() > 0


# ---------------------------------------------------------------------------------------------------- example


def test_finetune_lora_example_loss_decreases(tmp_path):
    """examples/finetune_lora.py on the tiny golden model and codec (ASR + TTS samples, LoRA on the LLM and the patch
    decoder): the loss falls at every step over 6 steps and the adapter is saved."""
    spec = importlib.util.spec_from_file_location("finetune_lora", REPO / "examples" / "finetune_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(
        [
            "--model",
            str(CHECKPOINT),
            "--audio_tokenizer",
            str(GOLDEN / "tok_a" / "checkpoint"),
            "--steps",
            "6",
            "--output_dir",
            str(tmp_path / "adapter"),
        ]
    )
    assert len(losses) == 6
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 16
