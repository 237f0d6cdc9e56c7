"""Patch-level `generate()` of MiMoAudioForConditionalGeneration against the original's recorded generations.

Golden grids `[C+1, frames]` are converted to our inputs: the text id at each group's first frame
(`grid[0, ::group_size]`) and the audio `grid[1:].T.reshape(positions, group_size, C)`.

Tolerances:
* fp32: generated ids (text tokens, 4xC patches, whole grids) must be EXACT; per-step text logits and patch decoder
  logits within 1e-4 abs (logits of magnitude ~1-10; the goldens' own 1-vs-2-thread noise is 2.9e-6).
* bf16: per-step logits within 0.1 abs (about 1.5 bf16 ulps at magnitudes 8-16, ~1% of the largest logit). Greedy
  trajectories may leave the golden one at a near-tie, so the generate() path is compared on the steps whose inputs
  still agree, and the whole golden trajectory is checked teacher-forced.
"""

import json
import threading

import pytest
import torch
from conftest import GOLDEN
from safetensors.torch import load_file
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from transformers_mimo.generation_mimo_audio import MiMoAudioGenerateOutput, MiMoAudioStreamer
from transformers_mimo.modeling_mimo_audio import MiMoAudioForConditionalGeneration


def _lm_cases() -> dict[str, list[str]]:
    """Every language-model golden case in the fixtures, with its prompts."""
    cases = {}
    for manifest_path in sorted(GOLDEN.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        if manifest["kind"] == "lm":
            cases[manifest["case"]] = list(manifest["prompts"])
    return cases


LM_CASES = _lm_cases()
CASES = list(LM_CASES)
RUNS = ["gen_nostop", "gen_stop"]
FP32_ATOL = 1e-4
BF16_ATOL = 0.1


def grid_to_inputs(grid: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Original frame grid `[C+1, frames]` -> `input_ids (1, T)`, `audio_input_ids (1, T, group_size, C)`."""
    grid = grid.long()
    channels = grid.shape[0] - 1
    positions = grid.shape[1] // group_size
    text = grid[0, ::group_size]
    audio = grid[1:].T.reshape(positions, group_size, channels)
    return text[None], audio[None]


@pytest.fixture(scope="module")
def golden():
    cache = {}

    def get(case):
        if case not in cache:
            tensors = load_file(GOLDEN / case / "golden.safetensors")
            manifest = json.loads((GOLDEN / case / "manifest.json").read_text())
            cache[case] = (tensors, manifest)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(case, dtype=torch.float32):
        if (case, dtype) not in cache:
            model = MiMoAudioForConditionalGeneration.from_pretrained(
                GOLDEN / case / "checkpoint", attn_implementation="sdpa", dtype=dtype
            )
            cache[case, dtype] = model.eval()
        return cache[case, dtype]

    return get


def generation_kwargs(manifest, dtype_key, prompt, run):
    """The original runs' settings in LLM positions: 12 new groups; gen_stop adds stop ids and min_new_tokens."""
    kwargs = {"max_new_tokens": manifest["generation"]["max_new_tokens"], "do_sample": False, "audio_do_sample": False}
    if run == "gen_nostop":
        kwargs["eos_token_id"] = None  # the original's no-stop run ignores every stop id
    else:
        info = manifest["info"][dtype_key]["prompts"][prompt]["gen_stop"]
        kwargs["eos_token_id"] = info["stop_tokens"]
        kwargs["min_new_tokens"] = info["min_new_tokens"]
        kwargs["pad_token_id"] = manifest["special_token_ids"]["<|endoftext|>"]
    return kwargs


class AddBias(LogitsProcessor):
    """Adds a fixed `(vocab_size,)` bias to the text scores, to steer the random test models."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias

    def __call__(self, input_ids, scores):
        return scores + self.bias


def stacked_audio(per_step, sample=0):
    """Output `audio_logits`/`audio_scores` -> one `(steps, group_size, vocab_c)` tensor per codebook."""
    channels = len(per_step[0])
    return [torch.stack([step[channel][sample] for step in per_step]) for channel in range(channels)]


# ---------------------------------------------------------------------------------------------------------------
# fp32 parity with the original (exact ids)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize(
    ("case", "prompt"), [(case, prompt) for case, prompts in LM_CASES.items() for prompt in prompts]
)
def test_greedy_generation_matches_original_fp32(case, prompt, run, cache_implementation, models, golden):
    """Both decode paths: the dynamic LLM cache (default), and the static one, whose static-shape decode step is
    the code `compile=True` compiles (the compiled functions are checked against it below)."""
    check_greedy_generation_against_original(
        case, prompt, run, models, golden, cache_implementation=cache_implementation
    )


@pytest.mark.parametrize("run", RUNS)
def test_compiled_greedy_generation_matches_original_fp32(run, models, golden):
    """`compile=True` at batch 1, the fast path's main case on CPU (one-row products decomposed into Inductor's loops,
    eager attention in the patch decoder; see `default_compile_config`): the original's ids exactly, its logits."""
    case = CASES[0]
    check_greedy_generation_against_original(case, LM_CASES[case][0], run, models, golden, compile=True)


def check_greedy_generation_against_original(case, prompt, run, models, golden, **generate_kwargs):
    """Greedy generation of a golden prompt against the original's run: grid, per-step tokens, logits and scores."""
    tensors, manifest = golden(case)
    model = models(case)
    group_size = model.config.group_size
    key = f"fp32.{prompt}.{run}"
    input_ids, audio_input_ids = grid_to_inputs(tensors[f"{prompt}.input_ids_grid"], group_size)
    prompt_length = input_ids.shape[1]

    out = model.generate(
        input_ids,
        audio_input_ids,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **generate_kwargs,
        **generation_kwargs(manifest, "fp32", prompt, run),
    )
    assert isinstance(out, MiMoAudioGenerateOutput)
    # the patch decoder runs under torch.inference_mode; what generate returns must stay ordinary tensors
    returned = [out.sequences, out.audio_sequences, *out.scores, *out.logits]
    returned += [values for step in out.audio_scores + out.audio_logits for values in step]
    assert not any(values.is_inference() for values in returned)

    # whole grid (prompt + generated), exact
    expected_ids, expected_audio = grid_to_inputs(tensors[f"{key}.generated_grid"], group_size)
    assert out.sequences.shape == expected_ids.shape
    assert torch.equal(out.sequences, expected_ids)
    assert torch.equal(out.audio_sequences, expected_audio)

    # per step: text token, speech flag, 4xC patch
    step_tokens = tensors[f"{key}.step_text_token"]
    num_steps = step_tokens.shape[0]
    assert out.sequences.shape[1] - prompt_length == num_steps == len(out.logits) == len(out.audio_logits)
    assert torch.equal(out.sequences[0, prompt_length:], step_tokens)
    assert torch.equal(out.audio_sequences[0, prompt_length:], tensors[f"{key}.step_local_tokens"])
    is_speech = tensors[f"{key}.step_is_speech"].bool()
    assert torch.equal(step_tokens == model.config.empty_token_id, is_speech)

    # raw per-step logits
    text_logits = torch.stack(out.logits)[:, 0]
    torch.testing.assert_close(text_logits, tensors[f"{key}.step_text_logits"], rtol=0, atol=FP32_ATOL)
    for channel, ours in enumerate(stacked_audio(out.audio_logits)):
        reference = tensors[f"{key}.step_local_logits_ch{channel}"]
        # NaN rows mark steps without a patch, as in the goldens
        assert torch.equal(ours.isnan().all(-1).all(-1), ~is_speech)
        torch.testing.assert_close(ours, reference, rtol=0, atol=FP32_ATOL, equal_nan=True)

    # processed patch scores (greedy): the raw logits with each codebook's empty id banned
    for channel, (scores, logits) in enumerate(zip(stacked_audio(out.audio_scores), stacked_audio(out.audio_logits))):
        empty_id = model.config.audio_empty_ids[channel]
        kept = torch.arange(scores.shape[-1]) != empty_id
        assert torch.isneginf(scores[is_speech][..., empty_id]).all()
        assert torch.equal(scores[is_speech][..., kept], logits[is_speech][..., kept])
        assert scores[~is_speech].isnan().all()

    # the min-length rule: stop ids get -inf exactly on the steps where the original removed them
    scores = torch.stack(out.scores)[:, 0]
    if run == "gen_stop":
        stop_ids = manifest["info"]["fp32"]["prompts"][prompt]["gen_stop"]["stop_tokens"]
        removed = tensors[f"{key}.step_stop_tokens_removed"].bool()
        banned = torch.isneginf(scores[:, stop_ids]).all(-1)
        assert torch.equal(banned, removed)
        assert removed.any()
        assert step_tokens[-1].item() in stop_ids or num_steps == manifest["generation"]["max_new_tokens"]
    else:
        assert not torch.isneginf(scores).any()


def test_min_new_tokens_bans_stop_ids_that_would_win(models, golden):
    """Without `min_new_tokens`, the stop id the original removed at a banned step wins, so generation ends earlier."""
    tensors, manifest = golden("lm_a")
    model = models("lm_a")
    key = "fp32.icl.gen_stop"
    kwargs = generation_kwargs(manifest, "fp32", "icl", "gen_stop")
    input_ids, audio_input_ids = grid_to_inputs(tensors["icl.input_ids_grid"], model.config.group_size)
    removed = tensors[f"{key}.step_stop_tokens_removed"].bool()
    logits = tensors[f"{key}.step_text_logits"]
    stop_ids = kwargs["eos_token_id"]
    # first banned step at which a stop id is the raw argmax
    first = next(step for step in range(len(removed)) if removed[step] and logits[step].argmax().item() in stop_ids)
    kwargs.pop("min_new_tokens")
    out = model.generate(input_ids, audio_input_ids, **kwargs)
    assert out.sequences.shape[1] - input_ids.shape[1] == first + 1
    assert out.sequences[0, -1].item() == logits[first].argmax().item()
    assert torch.equal(out.sequences[0, input_ids.shape[1] : -1], tensors[f"{key}.step_text_token"][:first])


# ---------------------------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------------------------


def check_bf16_generate_path(model, tensors, manifest, prompt, input_ids, audio_input_ids):
    """bf16 generate() (no-stop run): logits of the steps whose inputs still agree with the golden trajectory."""
    key = f"bf16.{prompt}.gen_nostop"
    prompt_length = input_ids.shape[1]
    step_tokens = tensors[f"{key}.step_text_token"]
    step_patches = tensors[f"{key}.step_local_tokens"]
    out = model.generate(
        input_ids,
        audio_input_ids,
        return_dict_in_generate=True,
        output_logits=True,
        **generation_kwargs(manifest, "bf16", prompt, "gen_nostop"),
    )
    generated = out.sequences.shape[1] - prompt_length
    assert generated == len(step_tokens)
    agree = 0
    while (
        agree < generated
        and out.sequences[0, prompt_length + agree] == step_tokens[agree]
        and torch.equal(out.audio_sequences[0, prompt_length + agree], step_patches[agree])
    ):
        agree += 1
    assert agree >= 1, f"{key}: the first step already differs"
    checked = min(agree + 1, generated)  # the first differing step's text logits still see golden inputs
    text_logits = torch.stack(out.logits)[:checked, 0].float()
    reference = tensors[f"{key}.step_text_logits"][:checked].float()
    torch.testing.assert_close(text_logits, reference, rtol=0, atol=BF16_ATOL)
    for channel, ours in enumerate(stacked_audio(out.audio_logits)):
        reference = tensors[f"{key}.step_local_logits_ch{channel}"][:agree].float()
        torch.testing.assert_close(ours[:agree].float(), reference, rtol=0, atol=BF16_ATOL, equal_nan=True)


@pytest.mark.parametrize("case", CASES)
def test_bf16_logits_match_original(case, models, golden):
    tensors, manifest = golden(case)
    model = models(case, torch.bfloat16)
    group_size = model.config.group_size
    for prompt in LM_CASES[case]:
        input_ids, audio_input_ids = grid_to_inputs(tensors[f"{prompt}.input_ids_grid"], group_size)
        prompt_length = input_ids.shape[1]
        for run in RUNS:
            if run == "gen_nostop":
                check_bf16_generate_path(model, tensors, manifest, prompt, input_ids, audio_input_ids)
            # the whole golden trajectory, teacher-forced
            key = f"bf16.{prompt}.{run}"
            text_reference = tensors[f"{key}.step_text_logits"].float()
            full_ids, full_audio = grid_to_inputs(tensors[f"{key}.generated_grid"], group_size)
            num_steps = full_ids.shape[1] - prompt_length
            with torch.no_grad():
                forced = model(
                    input_ids=full_ids[:, :-1], audio_input_ids=full_audio[:, :-1], logits_to_keep=num_steps
                )
                torch.testing.assert_close(forced.logits[0].float(), text_reference, rtol=0, atol=BF16_ATOL)
                is_speech = tensors[f"{key}.step_is_speech"].bool()
                if is_speech.any():
                    audio_logits = model.teacher_forced_audio_logits(
                        forced.last_hidden_state[0][is_speech], full_audio[0, prompt_length:][is_speech]
                    )
                    for channel, ours in enumerate(audio_logits):
                        reference = tensors[f"{key}.step_local_logits_ch{channel}"][is_speech].float()
                        torch.testing.assert_close(ours.float(), reference, rtol=0, atol=BF16_ATOL)


# ---------------------------------------------------------------------------------------------------------------
# batches, sampling, controls
# ---------------------------------------------------------------------------------------------------------------


def left_padded_batch(model, tensors, prompt_names, pad_token_id):
    """The golden prompts of one case as a left-padded batch (text pad id, empty audio ids, mask 0 on padding)."""
    prompts = [grid_to_inputs(tensors[f"{name}.input_ids_grid"], model.config.group_size) for name in prompt_names]
    length = max(ids.shape[1] for ids, _ in prompts)
    empty = torch.tensor(model.config.audio_empty_ids)
    input_ids = torch.full((len(prompts), length), pad_token_id)
    audio_input_ids = empty.expand(len(prompts), length, model.config.group_size, len(empty)).clone()
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, (ids, audio) in enumerate(prompts):
        input_ids[row, length - ids.shape[1] :] = ids[0]
        audio_input_ids[row, length - ids.shape[1] :] = audio[0]
        attention_mask[row, length - ids.shape[1] :] = 1
    return prompts, input_ids, audio_input_ids, attention_mask


@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch_equals_each_sample_alone(case, models, golden):
    tensors, manifest = golden(case)
    model = models(case)
    pad = manifest["special_token_ids"]["<|endoftext|>"]
    stop_ids = [pad, manifest["special_token_ids"]["<|im_end|>"], manifest["special_token_ids"]["<|eostm|>"]]
    kwargs = {"max_new_tokens": 12, "eos_token_id": stop_ids, "pad_token_id": pad}
    prompts, input_ids, audio_input_ids, attention_mask = left_padded_batch(model, tensors, LM_CASES[case], pad)
    batch = model.generate(input_ids, audio_input_ids, attention_mask=attention_mask, **kwargs)
    length = input_ids.shape[1]
    empty_patch = torch.tensor(model.config.audio_empty_ids).expand(model.config.group_size, -1)
    chose_audio = set()
    for row, (ids, audio) in enumerate(prompts):
        alone = model.generate(ids, audio, **kwargs)
        new_tokens = alone.sequences[0, ids.shape[1] :]
        new_patches = alone.audio_sequences[0, ids.shape[1] :]
        count = new_tokens.shape[0]
        assert torch.equal(batch.sequences[row, length : length + count], new_tokens)
        assert torch.equal(batch.audio_sequences[row, length : length + count], new_patches)
        # a finished sample stays padded
        assert (batch.sequences[row, length + count :] == pad).all()
        assert (batch.audio_sequences[row, length + count :] == empty_patch).all()
        chose_audio |= {(step, bool(token == model.config.empty_token_id)) for step, token in enumerate(new_tokens)}
    # on the public cases the samples choose text and audio at the same step (each decides for itself)
    steps_with_audio = {step for step, is_audio in chose_audio if is_audio}
    steps_with_text = {step for step, is_audio in chose_audio if not is_audio}
    if case in ("lm_a", "lm_b"):
        assert steps_with_audio & steps_with_text


def test_static_llm_cache_and_num_return_sequences(models, golden):
    tensors, _ = golden("lm_b")
    model = models("lm_b")
    input_ids, audio_input_ids = grid_to_inputs(tensors["icl.input_ids_grid"], model.config.group_size)
    prompt_length = input_ids.shape[1]
    dynamic = model.generate(input_ids, audio_input_ids, max_new_tokens=12, eos_token_id=None)
    static = model.generate(
        input_ids, audio_input_ids, max_new_tokens=12, eos_token_id=None, cache_implementation="static"
    )
    assert torch.equal(static.sequences, dynamic.sequences)
    assert torch.equal(static.audio_sequences, dynamic.audio_sequences)
    assert torch.equal(dynamic.sequences[0, prompt_length:], tensors["fp32.icl.gen_nostop.step_text_token"])

    torch.manual_seed(0)
    sampled = model.generate(
        input_ids, audio_input_ids, max_new_tokens=6, eos_token_id=None, do_sample=True, num_return_sequences=3
    )
    assert sampled.sequences.shape == (3, prompt_length + 6)
    assert sampled.audio_sequences.shape == (3, prompt_length + 6, *audio_input_ids.shape[2:])
    for row in range(3):  # every copy keeps the prompt
        assert torch.equal(sampled.sequences[row, :prompt_length], input_ids[0])
        assert torch.equal(sampled.audio_sequences[row, :prompt_length], audio_input_ids[0])
    assert not torch.equal(sampled.audio_sequences[0], sampled.audio_sequences[1])


def test_other_config_patches_match_teacher_forcing_and_batch():
    """A config unlike the goldens (3 codebooks, group size 3, delays [0, 2, 1], empty ids not last, projected
    embeddings): every generated patch equals the greedy choice of the teacher-forced patch decoder, whose logits
    match the ones generate() reports, and each sample of the batch equals that sample alone."""
    from transformers_mimo.configuration_mimo_audio import MiMoAudioConfig

    torch.manual_seed(0)
    wide_init = {"initializer_range": 0.3}  # clear margins between the top logits
    config = MiMoAudioConfig(
        text_config={
            "model_type": "qwen2",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            **wide_init,
        },
        patch_encoder_config={
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 12,
            **wide_init,
        },
        patch_decoder_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            **wide_init,
        },
        group_size=3,
        audio_channels=3,
        audio_vocab_sizes=[17, 9, 5],
        audio_empty_ids=[0, 8, 2],
        delay_pattern=[0, 2, 1],
        empty_token_id=60,
        **wide_init,
    )
    config._attn_implementation = "sdpa"
    model = MiMoAudioForConditionalGeneration(config).eval()
    assert model.patch_decoder.embeddings_proj is not None and config.patch_decoder_steps == 5

    input_ids = torch.randint(0, 59, (2, 7))
    input_ids[:, 2:4] = config.empty_token_id
    audio_input_ids = torch.stack([torch.randint(0, size, (2, 7, 3)) for size in config.audio_vocab_sizes], dim=-1)

    class AudioOnEvenLengths(LogitsProcessor):
        def __call__(self, ids, scores):
            scores = scores.clone()
            scores[:, config.empty_token_id] += 100.0 * (ids.shape[1] % 2 == 0)
            return scores

    kwargs = {
        "max_new_tokens": 8,
        "eos_token_id": None,
        "logits_processor": LogitsProcessorList([AudioOnEvenLengths()]),
    }
    out = model.generate(input_ids, audio_input_ids, return_dict_in_generate=True, output_logits=True, **kwargs)
    prompt_length = input_ids.shape[1]
    new_text = out.sequences[:, prompt_length:]
    new_audio = out.audio_sequences[:, prompt_length:]
    is_audio = new_text == config.empty_token_id
    assert is_audio[:, 1::2].all() and not is_audio[:, ::2].any()

    empty = torch.tensor(config.audio_empty_ids)
    assert (new_audio[~is_audio] == empty).all()
    assert not (new_audio[is_audio] == empty).any()

    with torch.no_grad():
        hidden = model(out.sequences[:, :-1], out.audio_sequences[:, :-1]).last_hidden_state[:, prompt_length - 1 :]
        forced = model.teacher_forced_audio_logits(hidden[is_audio], new_audio[is_audio])
    reported = stacked_audio(out.audio_logits, sample=0), stacked_audio(out.audio_logits, sample=1)
    for channel, logits in enumerate(forced):
        banned = logits.clone()
        banned[..., config.audio_empty_ids[channel]] = float("-inf")
        assert torch.equal(banned.argmax(-1), new_audio[is_audio][..., channel])
        ours = torch.cat([reported[0][channel][is_audio[0]], reported[1][channel][is_audio[1]]])
        torch.testing.assert_close(ours, logits, rtol=0, atol=FP32_ATOL)

    alone = model.generate(input_ids[1:], audio_input_ids[1:], return_dict_in_generate=True, **kwargs)
    assert torch.equal(alone.sequences[0], out.sequences[1])
    assert torch.equal(alone.audio_sequences[0], out.audio_sequences[1])


def test_compiled_generation_equals_eager(models, golden):
    """`compile=True` (static caches, the decode step and the whole patch compiled by torch.compile) generates the
    eager ids exactly in fp32: greedy with stop ids on a left-padded batch whose samples choose text and audio at the
    same step, and seeded sampling (the compiled sampling draws from the same generator as eager)."""
    tensors, manifest = golden("lm_a")
    model = models("lm_a")
    pad = manifest["special_token_ids"]["<|endoftext|>"]
    stop_ids = [pad, manifest["special_token_ids"]["<|im_end|>"], manifest["special_token_ids"]["<|eostm|>"]]
    _, input_ids, audio_input_ids, attention_mask = left_padded_batch(model, tensors, LM_CASES["lm_a"][:2], pad)
    greedy = {"max_new_tokens": 8, "eos_token_id": stop_ids, "pad_token_id": pad}
    sampling = {"do_sample": True, "temperature": 1.5, "top_k": 0, "max_new_tokens": 6, "eos_token_id": None}
    # The batch, and its second sample alone (steered to speech, so that it generates patches): at batch 1 the
    # compiled one-row products are Inductor's own loops.
    speech_bias = torch.zeros(model.config.text_config.vocab_size)
    speech_bias[model.config.empty_token_id] = 10.0
    batches = (
        ((input_ids, audio_input_ids, attention_mask), {}),
        (
            (input_ids[1:], audio_input_ids[1:], attention_mask[1:]),
            {"logits_processor": LogitsProcessorList([AddBias(speech_bias)])},
        ),
    )
    for batch_inputs, steering in batches:
        for kwargs, seed in ((greedy, None), (sampling, 0)):
            runs = []
            for compile_steps in (False, True):
                if seed is not None:
                    torch.manual_seed(seed)
                runs.append(model.generate(*batch_inputs, compile=compile_steps, **kwargs, **steering))
            eager, compiled = runs
            assert torch.equal(compiled.sequences, eager.sequences)
            assert torch.equal(compiled.audio_sequences, eager.audio_sequences)
            is_audio = eager.sequences[:, input_ids.shape[1] :] == model.config.empty_token_id
            assert is_audio.any()
            if len(is_audio) > 1:  # a step where one sample chose audio, the other text
                assert (is_audio.any(0) & ~is_audio.all(0)).any()
    assert hasattr(model, "_compiled_generation_steps")


def test_seeded_sampling_is_reproducible_and_respects_top_k(models, golden):
    tensors, _ = golden("lm_a")
    model = models("lm_a")
    input_ids, audio_input_ids = grid_to_inputs(tensors["icl.input_ids_grid"], model.config.group_size)
    sampling = {
        "do_sample": True,
        "temperature": 1.5,
        "top_k": 0,
        "audio_temperature": 1.5,
        "max_new_tokens": 10,
        "eos_token_id": None,
    }
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model.generate(input_ids, audio_input_ids, **sampling))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].audio_sequences, runs[1].audio_sequences)
    assert not torch.equal(runs[0].audio_sequences, runs[2].audio_sequences)

    greedy = model.generate(input_ids, audio_input_ids, max_new_tokens=10, eos_token_id=None)
    torch.manual_seed(2)
    top1 = model.generate(input_ids, audio_input_ids, **{**sampling, "top_k": 1, "audio_top_k": 1})
    assert torch.equal(top1.sequences, greedy.sequences)
    assert torch.equal(top1.audio_sequences, greedy.audio_sequences)

    # audio sampled, text greedy: the text channel stays greedy until the first sampled patch feeds back
    torch.manual_seed(3)
    mixed = model.generate(input_ids, audio_input_ids, max_new_tokens=10, eos_token_id=None, audio_do_sample=True)
    prompt_length = input_ids.shape[1]
    assert mixed.sequences[0, prompt_length] == greedy.sequences[0, prompt_length]


def _warped_reference(logits, temperature, top_p, banned=(), ban_after=False):
    """Temperature then nucleus filtering, written out in float64: a token is kept when the probability of the tokens
    no likelier than it, itself included, exceeds `1 - top_p`. `banned` tokens are removed first, or last with
    `ban_after` (the original's order). Returns the scores and the tokens within 1e-6 of that boundary (where float32
    rounding may decide either way)."""
    scores = logits.double().clone()
    if not ban_after:
        scores[..., list(banned)] = float("-inf")
    scores = scores / temperature
    probs = scores.softmax(-1)
    ascending, order = probs.sort(-1)
    mass_up_to = ascending.cumsum(-1).gather(-1, order.argsort(-1))  # per token, the mass of tokens <= it
    kept = mass_up_to > 1 - top_p
    kept |= probs == probs.max(-1, keepdim=True).values
    near = (mass_up_to - (1 - top_p)).abs() < 1e-6
    scores = torch.where(kept, scores, float("-inf"))
    if ban_after:
        scores[..., list(banned)] = float("-inf")
    return scores, near


def test_temperature_and_top_p_shape_text_and_audio_scores(models, golden):
    """Every returned score (text per step, audio per codebook and frame) is the raw logits (plus the user's
    processor; with the codebook's empty id banned for audio) divided by the temperature, with exactly the top-p
    nucleus left finite; and the sampled tokens lie in it."""
    tensors, _ = golden("lm_a")
    model = models("lm_a")
    config = model.config
    input_ids, audio_input_ids = grid_to_inputs(tensors["icl.input_ids_grid"], config.group_size)
    bias = torch.zeros(config.text_config.vocab_size)
    bias[config.empty_token_id] = 4.0  # a mix of text and audio steps

    torch.manual_seed(0)
    out = model.generate(
        input_ids,
        audio_input_ids,
        max_new_tokens=10,
        eos_token_id=None,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=0.8,
        audio_temperature=1.3,
        audio_top_k=None,
        audio_top_p=0.6,
        logits_processor=LogitsProcessorList([AddBias(bias)]),
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    prompt_length = input_ids.shape[1]
    audio_steps = 0
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        expected, near = _warped_reference(logits + bias, 0.7, 0.8)
        finite = torch.isfinite(scores)
        assert torch.equal(finite[~near], torch.isfinite(expected)[~near])
        torch.testing.assert_close(scores[finite].double(), expected[finite], rtol=1e-6, atol=1e-6)
        assert finite[0, out.sequences[0, prompt_length + step]]
        if out.sequences[0, prompt_length + step] != config.empty_token_id:
            continue
        audio_steps += 1
        for channel, (audio_scores, audio_logits) in enumerate(zip(out.audio_scores[step], out.audio_logits[step])):
            expected, near = _warped_reference(audio_logits[0], 1.3, 0.6, banned=[config.audio_empty_ids[channel]])
            finite = torch.isfinite(audio_scores[0])
            assert torch.equal(finite[~near], torch.isfinite(expected)[~near])
            torch.testing.assert_close(audio_scores[0][finite].double(), expected[finite], rtol=1e-6, atol=1e-6)
            codes = out.audio_sequences[0, prompt_length + step, :, channel]
            assert finite.gather(-1, codes[:, None]).all()
            assert (finite.sum(-1) < audio_scores.shape[-1] - 1).any()  # the nucleus removed something
    assert 2 <= audio_steps < 10


@pytest.mark.parametrize("original_order", [False, True])
def test_original_sampling_order_bans_after_filtering(models, golden, original_order):
    """Stop ids under `min_new_tokens` and each codebook's empty id are removed before top-p by default and after it
    with `original_sampling_order=True` (the original's order), for the text and every codebook; the two orders
    really differ here."""
    tensors, _ = golden("lm_a")
    model = models("lm_a")
    config = model.config
    input_ids, audio_input_ids = grid_to_inputs(tensors["icl.input_ids_grid"], config.group_size)
    stop = 7
    bias = torch.zeros(config.text_config.vocab_size)
    bias[config.empty_token_id], bias[stop] = 4.0, 6.0  # audio steps, and a stop id inside the nucleus

    torch.manual_seed(0)
    out = model.generate(
        input_ids,
        audio_input_ids,
        max_new_tokens=8,
        min_new_tokens=8,
        eos_token_id=[stop],
        pad_token_id=0,
        do_sample=True,
        top_k=0,
        top_p=0.9,
        audio_top_p=0.7,
        original_sampling_order=original_order,
        logits_processor=LogitsProcessorList([AddBias(bias)]),
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    orders_differ = {"text": 0, "audio": 0}
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        checks = [("text", scores[0], logits[0] + bias, 0.9, [stop])]
        if out.sequences[0, input_ids.shape[1] + step] == config.empty_token_id:
            for channel, (audio_scores, audio_logits) in enumerate(
                zip(out.audio_scores[step], out.audio_logits[step])
            ):
                checks.append(("audio", audio_scores[0], audio_logits[0], 0.7, [config.audio_empty_ids[channel]]))
        for kind, got, raw, top_p, banned in checks:
            expected, near = _warped_reference(raw, 1.0, top_p, banned, ban_after=original_order)
            other, _ = _warped_reference(raw, 1.0, top_p, banned, ban_after=not original_order)
            finite = torch.isfinite(got)
            assert torch.equal(finite[~near], torch.isfinite(expected)[~near])
            torch.testing.assert_close(got[finite].double(), expected[finite], rtol=1e-6, atol=1e-6)
            orders_differ[kind] += int(not torch.equal(torch.isfinite(expected), torch.isfinite(other)))
    assert stop not in out.sequences[0, input_ids.shape[1] :]
    assert orders_differ["text"] >= 2 and orders_differ["audio"] >= 1, orders_differ


def test_original_sampling_order_with_only_banned_tokens_left_is_a_clear_error(models, golden):
    tensors, _ = golden("lm_a")
    model = models("lm_a")
    input_ids, audio_input_ids = grid_to_inputs(tensors["icl.input_ids_grid"], model.config.group_size)
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[7] = 100.0  # the stop id takes the whole nucleus, and min_new_tokens bans it

    class Bias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores + bias

    kwargs = {
        "max_new_tokens": 2,
        "min_new_tokens": 2,
        "eos_token_id": [7],
        "pad_token_id": 0,
        "do_sample": True,
        "top_p": 0.5,
    }
    kwargs["logits_processor"] = LogitsProcessorList([AddBias(bias)])
    with pytest.raises(ValueError, match="kept only banned tokens for the text channel"):
        model.generate(input_ids, audio_input_ids, original_sampling_order=True, **kwargs)
    assert model.generate(input_ids, audio_input_ids, **kwargs).sequences.shape[1] == input_ids.shape[1] + 2


@pytest.mark.parametrize("biased_row", [0, 1])
def test_original_sampling_order_in_a_batch_checks_only_the_rows_it_uses(models, golden, monkeypatch, biased_row):
    """Row 0 chooses text, row 1 audio; one row's patch decoder prefers its empty id so much that top-p keeps only it.
    The patch of a text row is discarded, so that row must not stop generation; the audio row's must (a clear error)."""
    tensors, _ = golden("lm_a")
    model = models("lm_a")
    config = model.config
    input_ids, audio_input_ids = grid_to_inputs(tensors["icl.input_ids_grid"], config.group_size)
    input_ids, audio_input_ids = input_ids.expand(2, -1), audio_input_ids.expand(2, -1, -1, -1)

    class TextThenAudio(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, float("-inf"))
            forced[0, 5], forced[1, config.empty_token_id] = 0.0, 0.0
            return forced

    get_audio_logits = model.get_audio_logits

    def prefer_empty(hidden, channel):
        logits = get_audio_logits(hidden, channel).clone()
        logits[biased_row, config.audio_empty_ids[channel]] += 100.0
        return logits

    monkeypatch.setattr(model, "get_audio_logits", prefer_empty)
    kwargs = {
        "max_new_tokens": 1,
        "do_sample": True,
        "audio_top_p": 0.5,
        "eos_token_id": None,
        "original_sampling_order": True,
    }
    kwargs["logits_processor"] = LogitsProcessorList([TextThenAudio()])
    if biased_row == 1:
        with pytest.raises(ValueError, match="kept only banned tokens for codebook 0"):
            model.generate(input_ids, audio_input_ids, **kwargs)
        return
    out = model.generate(input_ids, audio_input_ids, **kwargs)
    assert out.sequences[:, -1].tolist() == [5, config.empty_token_id]
    empty = torch.tensor(config.audio_empty_ids)
    assert (out.audio_sequences[0, -1] == empty).all() and not (out.audio_sequences[1, -1] == empty).any()


def test_sampled_audio_never_emits_empty_ids(models, golden):
    """High-temperature sampling of many patches: empty ids never appear at audio positions, always elsewhere."""
    tensors, manifest = golden("lm_b")
    model = models("lm_b")
    config = model.config
    _, input_ids, audio_input_ids, attention_mask = left_padded_batch(
        model, tensors, LM_CASES["lm_b"], manifest["special_token_ids"]["<|endoftext|>"]
    )
    torch.manual_seed(0)
    empty_bias = torch.zeros(config.text_config.vocab_size)
    empty_bias[config.empty_token_id] = 30.0

    out = model.generate(
        input_ids,
        audio_input_ids,
        attention_mask=attention_mask,
        max_new_tokens=16,
        eos_token_id=None,
        do_sample=True,
        audio_temperature=5.0,
        logits_processor=LogitsProcessorList([AddBias(empty_bias)]),
    )
    new_text = out.sequences[:, input_ids.shape[1] :]
    new_audio = out.audio_sequences[:, input_ids.shape[1] :]
    empty = torch.tensor(config.audio_empty_ids)
    is_audio = new_text == config.empty_token_id
    assert is_audio.sum() >= 40
    assert not (new_audio[is_audio] == empty).any()
    assert (new_audio[~is_audio] == empty).all()


def test_user_logits_processor_and_stopping_criteria(models, golden):
    tensors, _ = golden("lm_a")
    model = models("lm_a")
    input_ids, _ = grid_to_inputs(tensors["text.input_ids_grid"], model.config.group_size)
    forced = [7, model.config.empty_token_id, 9]

    class ForceTokens(LogitsProcessor):
        def __call__(self, ids, scores):
            step = ids.shape[1] - input_ids.shape[1]
            forced_scores = torch.full_like(scores, float("-inf"))
            forced_scores[:, forced[step % len(forced)]] = 0.0
            return forced_scores

    class StopAfter(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            return torch.full((ids.shape[0],), ids.shape[1] - input_ids.shape[1] >= 5, dtype=torch.bool)

    out = model.generate(
        input_ids,
        logits_processor=LogitsProcessorList([ForceTokens()]),
        stopping_criteria=[StopAfter()],
        max_new_tokens=20,
        eos_token_id=None,
    )
    empty_token = model.config.empty_token_id
    assert out.sequences[0, input_ids.shape[1] :].tolist() == [7, empty_token, 9, 7, empty_token]
    empty = torch.tensor(model.config.audio_empty_ids)
    new_audio = out.audio_sequences[0, input_ids.shape[1] :]
    assert (new_audio[[0, 2, 3]] == empty).all()
    assert not (new_audio[[1, 4]] == empty).any()


def test_max_new_tokens_counts_llm_positions_and_text_only_prompt_default(models, golden):
    tensors, _ = golden("lm_b")
    model = models("lm_b")
    input_ids, audio_input_ids = grid_to_inputs(tensors["text.input_ids_grid"], model.config.group_size)
    # a text-only prompt: audio_input_ids may be omitted (all empty ids)
    with_audio = model.generate(input_ids, audio_input_ids, max_new_tokens=7, eos_token_id=None)
    without = model.generate(input_ids, max_new_tokens=7, eos_token_id=None)
    assert with_audio.sequences.shape == (1, input_ids.shape[1] + 7)
    patch_shape = (model.config.group_size, model.config.audio_channels)
    assert with_audio.audio_sequences.shape == (1, input_ids.shape[1] + 7, *patch_shape)
    assert torch.equal(with_audio.sequences, without.sequences)
    assert torch.equal(with_audio.audio_sequences, without.audio_sequences)
    expected = tensors["fp32.text.gen_nostop.step_text_token"][:7]
    assert torch.equal(without.sequences[0, input_ids.shape[1] :], expected)
    # the model's default is the dict output (its generation config sets return_dict_in_generate); scores only on
    # request. With return_dict_in_generate=False, the `sequences` tensor, as every Transformers model returns.
    assert model.generation_config.return_dict_in_generate is True
    assert without.scores is None and without.logits is None and without.cache is not None
    sequences = model.generate(input_ids, max_new_tokens=7, eos_token_id=None, return_dict_in_generate=False)
    assert isinstance(sequences, torch.Tensor) and torch.equal(sequences, without.sequences)
    with_states = model.generate(
        input_ids, max_new_tokens=3, eos_token_id=None, return_dict_in_generate=True, output_hidden_states=True
    )
    hidden_size = model.config.text_config.hidden_size
    assert len(with_states.hidden_states) == 3
    assert with_states.hidden_states[0][-1].shape == (1, input_ids.shape[1], hidden_size)  # prefill
    assert with_states.hidden_states[2][-1].shape == (1, 1, hidden_size)
    assert with_states.cache.get_seq_length() == input_ids.shape[1] + 2


def test_streamers_receive_every_step(models, golden):
    tensors, _ = golden("lm_a")
    model = models("lm_a")
    input_ids, audio_input_ids = grid_to_inputs(tensors["asr.input_ids_grid"], model.config.group_size)
    # the intended use: generate in a thread, consume the steps as they come
    streamer = MiMoAudioStreamer(timeout=60)
    result = {}
    kwargs = {"max_new_tokens": 6, "eos_token_id": None, "streamer": streamer}
    thread = threading.Thread(target=lambda: result.update(out=model.generate(input_ids, audio_input_ids, **kwargs)))
    thread.start()
    items = list(streamer)
    thread.join()
    out = result["out"]
    assert len(items) == 6
    for step, (text, patch) in enumerate(items):
        assert torch.equal(text, out.sequences[:, input_ids.shape[1] + step])
        assert torch.equal(patch, out.audio_sequences[:, input_ids.shape[1] + step])
    assert any(bool(text == model.config.empty_token_id) for text, _ in items)

    with_prompt = MiMoAudioStreamer(skip_prompt=False)
    model.generate(input_ids, audio_input_ids, max_new_tokens=2, eos_token_id=None, streamer=with_prompt)
    first, *rest = list(with_prompt)
    assert torch.equal(first[0], input_ids) and first[1] is None and len(rest) == 2

    class TextOnly(BaseStreamer):
        def __init__(self):
            self.values, self.ended = [], False

        def put(self, value):
            self.values.append(value)

        def end(self):
            self.ended = True

    plain = TextOnly()
    model.generate(input_ids, audio_input_ids, max_new_tokens=3, eos_token_id=None, streamer=plain)
    assert plain.ended and len(plain.values) == 4
    assert torch.equal(plain.values[0], input_ids)
    assert torch.equal(
        torch.stack(plain.values[1:], dim=1), out.sequences[:, input_ids.shape[1] : input_ids.shape[1] + 3]
    )


def test_audio_controls_round_trip_through_generation_config(models, golden, tmp_path):
    tensors, _ = golden("lm_a")
    model = models("lm_a")
    input_ids, audio_input_ids = grid_to_inputs(tensors["icl.input_ids_grid"], model.config.group_size)
    config = GenerationConfig(
        audio_do_sample=True,
        audio_temperature=0.7,
        audio_top_k=1,
        audio_top_p=0.9,
        max_new_tokens=5,
        return_dict_in_generate=True,  # a whole new generation config: say that the audio is wanted
    )
    config._from_model_config = False  # otherwise the custom keys are dropped on reload
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert {key: saved[key] for key in ("audio_do_sample", "audio_temperature", "audio_top_k", "audio_top_p")} == {
        "audio_do_sample": True,
        "audio_temperature": 0.7,
        "audio_top_k": 1,
        "audio_top_p": 0.9,
    }
    reloaded = GenerationConfig.from_pretrained(tmp_path)
    assert (reloaded.audio_do_sample, reloaded.audio_temperature, reloaded.audio_top_k, reloaded.audio_top_p) == (
        True,
        0.7,
        1,
        0.9,
    )
    original = model.generation_config
    try:
        model.generation_config = reloaded
        torch.manual_seed(0)
        from_config = model.generate(input_ids, audio_input_ids, eos_token_id=None)
        # keyword arguments override the stored values
        torch.manual_seed(0)
        overridden = model.generate(
            input_ids, audio_input_ids, eos_token_id=None, audio_top_k=0, audio_temperature=3.0
        )
    finally:
        model.generation_config = original
    greedy = model.generate(input_ids, audio_input_ids, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(from_config.audio_sequences, greedy.audio_sequences)  # top-1 sampling is greedy
    assert not torch.equal(overridden.audio_sequences, greedy.audio_sequences)


def test_bad_inputs_raise(models):
    model = models("lm_a")
    input_ids = torch.tensor([[401, 5, 6]])
    with pytest.raises(ValueError, match="audio_input_ids"):
        model.generate(input_ids, torch.zeros(1, 3, 4, 7, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(input_ids[0], max_new_tokens=1)
    with pytest.raises(ValueError, match="audio_temperature"):
        model.generate(input_ids, max_new_tokens=1, audio_temperature=0.0)
    with pytest.raises(ValueError, match="audio_top_p"):
        model.generate(input_ids, max_new_tokens=1, audio_top_p=1.5)
    with pytest.raises(ValueError, match="greedy search or sampling"):
        model.generate(input_ids, max_new_tokens=1, num_beams=2)
