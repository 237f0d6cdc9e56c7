"""MiMoAudioConfig / MiMoAudioForConditionalGeneration: parity with the original (golden lm_a, lm_b), batching,
attention implementations, and the official training loss against a straightforward loop implementation.

Tolerances: fp32 tensors within 1e-4 abs of the goldens (observed ≤ 4e-6; the goldens' own 1-vs-2-thread noise
is 2.9e-6). bf16 tensors (model loaded in bf16, as the original's `MimoAudio` does) within the per-tensor bounds
given in `BF16_ATOL` (a few bf16 ulps at magnitudes ~4; the bf16-vs-fp32 gap of the goldens is 0.02–0.08).
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMultimodalLM,
    AutoModelForTextToWaveform,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
)

from transformers_mimo import MiMoAudioConfig, MiMoAudioForConditionalGeneration, MiMoAudioModel
from transformers_mimo.configuration_mimo_audio import MiMoAudioPatchDecoderConfig, MiMoAudioPatchEncoderConfig


CASES = ("lm_a", "lm_b")
PROMPTS = ("text", "asr", "icl")
FP32_ATOL = 1e-4
# bf16 bounds per tensor: max abs difference to the bf16 goldens.
BF16_ATOL = {
    "inputs_embeds": 0.016,
    "backbone_last_hidden_state": 0.05,
    "text_logits": 0.04,
    "local_hidden_states": 0.03,
    "local_logits": 0.02,
}

_GOLDENS = {}
_MODELS = {}


def golden(case):
    if case not in _GOLDENS:
        _GOLDENS[case] = load_file(str(GOLDEN / case / "golden.safetensors"))
    return _GOLDENS[case]


def load_model(case, dtype=torch.float32, attn="sdpa"):
    key = (case, dtype, attn)
    if key not in _MODELS:
        _MODELS[key] = MiMoAudioForConditionalGeneration.from_pretrained(
            GOLDEN / case / "checkpoint", dtype=dtype, attn_implementation=attn
        ).eval()
    return _MODELS[key]


def grid_to_inputs(grid, config):
    """Original `[C+1, frames]` grid -> `input_ids (1, T)` and `audio_input_ids (1, T, G, C)`."""
    group, channels = config.group_size, config.audio_channels
    grid = grid.long()
    input_ids = grid[0, ::group][None]
    audio_input_ids = grid[1:].T.reshape(-1, group, channels)[None]
    return input_ids, audio_input_ids


def prefill(model, case, prompt):
    input_ids, audio_input_ids = grid_to_inputs(golden(case)[f"{prompt}.input_ids_grid"], model.config)
    with torch.no_grad():
        inputs_embeds = model.model.get_inputs_embeds(input_ids, audio_input_ids)
        out = model(input_ids=input_ids, audio_input_ids=audio_input_ids)
        local = model.get_patch_decoder_inputs(out.last_hidden_state[:, -1:])
    return {
        "inputs_embeds": inputs_embeds,
        "backbone_last_hidden_state": out.last_hidden_state,
        "text_logits": out.logits[:, -1:],
        "local_hidden_states": local,
    }


def greedy_patch(model, local_hidden_states):
    """One greedy patch, written out step by step: delay pattern, each codebook's empty id banned, incremental cache.

    Returns the `(1, group_size, C)` codes and per codebook the `(group_size, V_c)` logits.
    """
    config = model.config
    cache = DynamicCache(config=config.patch_decoder_config)
    inputs = local_hidden_states
    codes = torch.zeros(1, config.group_size, config.audio_channels, dtype=torch.long)
    logits = [[] for _ in range(config.audio_channels)]
    with torch.no_grad():
        for step in range(config.group_size + max(config.delay_pattern)):
            hidden = model.patch_decoder(inputs, cache=cache)[:, -1]
            step_codes = torch.zeros(1, config.audio_channels, dtype=torch.long)
            active = torch.zeros(1, config.audio_channels, dtype=torch.bool)
            for channel, delay in enumerate(config.delay_pattern):
                if delay <= step < delay + config.group_size:
                    channel_logits = model.get_audio_logits(hidden, channel)
                    logits[channel].append(channel_logits[0])
                    scores = channel_logits.clone()
                    scores[:, config.audio_empty_ids[channel]] = float("-inf")
                    step_codes[0, channel] = scores.argmax(-1)[0]
                    active[0, channel] = True
                    codes[0, step - delay, channel] = step_codes[0, channel]
            inputs = model.embed_patch_decoder_codes(step_codes, active)[:, None]
    return codes, [torch.stack(rows) for rows in logits]


# ----------------------------------------------------------------------------------------------------------------
# configuration


def test_config_from_original_checkpoint():
    config = MiMoAudioConfig.from_pretrained(GOLDEN / "lm_a" / "checkpoint")
    assert config.model_type == "mimo_audio"
    assert config.audio_vocab_sizes == [65, 65, 17, 17, 17, 17, 17, 17]
    assert config.audio_empty_ids == [64, 64, 16, 16, 16, 16, 16, 16]
    assert config.delay_pattern == [0, 1, 2, 3, 4, 5, 6, 7]
    assert (config.group_size, config.audio_channels, config.input_full_attention) == (4, 8, True)
    # special ids come from the tokenizer files next to the checkpoint
    assert (config.empty_token_id, config.sosp_token_id, config.eosp_token_id) == (405, 403, 404)
    assert (config.sostm_token_id, config.eostm_token_id, config.eot_token_id) == (408, 409, 410)
    assert (config.im_start_token_id, config.im_end_token_id) == (401, 402)
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64,
        2,
        4,
        2,
    )
    assert (text.head_dim, text.intermediate_size, text.vocab_size) == (16, 128, 416)
    assert text.rope_parameters["rope_theta"] == 640000.0
    # quirk 3: decoder = local_*; encoder = input_local_dim with ffn 4*dim; no GQA; dropout = local_attn_dropout
    decoder, encoder = config.patch_decoder_config, config.patch_encoder_config
    assert (decoder.hidden_size, decoder.num_hidden_layers, decoder.num_attention_heads) == (32, 2, 4)
    assert (decoder.num_key_value_heads, decoder.head_dim, decoder.intermediate_size) == (4, 8, 64)
    assert (encoder.hidden_size, encoder.num_hidden_layers, encoder.num_attention_heads) == (48, 2, 4)
    assert (encoder.num_key_value_heads, encoder.head_dim, encoder.intermediate_size) == (4, 12, 192)
    assert decoder.attention_dropout == encoder.attention_dropout == 0.1
    assert decoder.rope_parameters["rope_theta"] == encoder.rope_parameters["rope_theta"] == 640000.0
    assert decoder.rms_norm_eps == encoder.rms_norm_eps == 1e-6


def test_config_original_without_tokenizer_and_null_fields(tmp_path):
    original = json.loads((GOLDEN / "lm_b" / "checkpoint" / "config.json").read_text())
    original.update(input_full_attention=None, input_local_dim=None, delay_pattern="2-0-1-0-0-0-0-3")
    del original["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(original))
    # No tokenizer files: the released model's special token ids, which this 448-token vocabulary does not hold.
    with pytest.raises(ValueError, match=r"`empty_token_id` \(151667\) is outside the text vocabulary \(448 tokens\)"):
        MiMoAudioConfig.from_pretrained(tmp_path)
    original["vocab_size"] = 151680
    (tmp_path / "config.json").write_text(json.dumps(original))
    config = MiMoAudioConfig.from_pretrained(tmp_path)
    assert config.empty_token_id == 151667 and config.im_end_token_id == 151645  # released model's ids
    assert config.input_full_attention is False  # the original's `None` means causal
    assert config.patch_encoder_config.hidden_size == 48  # input_local_dim None -> local_dim
    assert config.text_config.head_dim == 128  # the original's default
    assert config.delay_pattern == [2, 0, 1, 0, 0, 0, 0, 3]
    assert config.patch_decoder_steps == 4 + 3


def test_config_defaults_are_the_released_model():
    config = MiMoAudioConfig()
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        4096,
        36,
        32,
        8,
    )
    assert (text.head_dim, text.intermediate_size, text.vocab_size) == (128, 11008, 151680)
    assert text.rope_parameters["rope_theta"] == 640000.0
    encoder, decoder = config.patch_encoder_config, config.patch_decoder_config
    assert (
        encoder.hidden_size,
        encoder.num_hidden_layers,
        encoder.num_attention_heads,
        encoder.intermediate_size,
    ) == (1024, 6, 64, 4096)
    assert (
        decoder.hidden_size,
        decoder.num_hidden_layers,
        decoder.num_attention_heads,
        decoder.intermediate_size,
    ) == (1024, 16, 64, 4096)
    assert decoder.attention_dropout == 0.1 and config.input_full_attention is True
    assert config.audio_vocab_sizes == [1025, 1025] + [129] * 6
    assert config.audio_empty_ids == [1024, 1024] + [128] * 6
    assert config.delay_pattern == list(range(8)) and config.group_size == 4
    assert config.text_loss_weight == 100.0 and config.empty_token_loss_weight == 0.01
    assert config.audio_loss_weights == [12, 8, 6, 4, 2, 2, 1, 1]
    assert config.empty_token_id == 151667 and config.eot_token_id == 151672


def test_config_other_channel_counts_and_validation():
    assert MiMoAudioConfig(audio_channels=4).audio_loss_weights == [12, 8, 6, 4]
    assert MiMoAudioConfig(audio_channels=10).audio_loss_weights == [12, 8, 6, 4, 2, 2, 1, 1, 1, 1]
    assert MiMoAudioConfig(audio_channels=3).audio_empty_ids == [1024, 1024, 128]
    with pytest.raises(ValueError, match="delay_pattern"):
        MiMoAudioConfig(audio_channels=3, delay_pattern=[0, 1])
    with pytest.raises(ValueError, match="audio_empty_ids"):
        MiMoAudioConfig(audio_channels=2, audio_vocab_sizes=[10, 10], audio_empty_ids=[9, 10])
    with pytest.raises(ValueError, match="outside the text vocabulary"):
        MiMoAudioConfig(text_config={"vocab_size": 1000})  # the default <|empty|> id is 151667
    assert MiMoAudioConfig(text_config={"vocab_size": 1000}, empty_token_id=999).empty_token_id == 999


def test_config_round_trip_and_auto_classes(tmp_path):
    model = load_model("lm_a")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mimo_audio" and saved["audio_vocab_sizes"] == [65, 65] + [17] * 6
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MiMoAudioConfig)
    assert isinstance(config.patch_encoder_config, MiMoAudioPatchEncoderConfig)
    assert isinstance(config.patch_decoder_config, MiMoAudioPatchDecoderConfig)
    drop_path = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop_path(config.to_dict()) == drop_path(model.config.to_dict())
    for auto_class in (AutoModel, AutoModelForTextToWaveform, AutoModelForMultimodalLM):
        reloaded = auto_class.from_pretrained(tmp_path)
        assert type(reloaded) is MiMoAudioForConditionalGeneration
    reloaded_state = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded_state[name]), name
    base = MiMoAudioModel.from_pretrained(tmp_path)  # the heads are left out on purpose
    for name, tensor in model.model.state_dict().items():
        assert torch.equal(tensor, base.state_dict()[name]), name


def test_original_checkpoint_loads_with_all_weights():
    model = load_model("lm_a")
    original = load_file(str(GOLDEN / "lm_a" / "checkpoint" / "model.safetensors"))
    ours = model.state_dict()
    assert len(ours) == len(original)
    pairs = {
        "speech_embeddings.3.weight": "model.audio_embeddings.3.weight",
        "model.layers.1.self_attn.k_proj.bias": "model.language_model.layers.1.self_attn.k_proj.bias",
        "model.norm.weight": "model.language_model.norm.weight",
        "input_local_transformer.layers.0.mlp.up_proj.weight": "model.patch_encoder.layers.0.mlp.up_proj.weight",
        "input_local_transformer.norm.weight": "model.patch_encoder.norm.weight",
        "speech_group_downcast.weight": "model.patch_encoder.proj.weight",
        "hidden_states_downcast.weight": "patch_decoder.input_proj.weight",
        "speech_embeddings_to_local.weight": "patch_decoder.embeddings_proj.weight",
        "local_transformer.layers.1.self_attn.o_proj.weight": "patch_decoder.layers.1.self_attn.o_proj.weight",
        "local_transformer_lm_heads.7.weight": "patch_decoder.heads.7.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for original_key, our_key in pairs.items():
        assert torch.equal(original[original_key], ours[our_key]), original_key
    assert load_model("lm_b").patch_decoder.embeddings_proj is None  # lm_b: embedding width == decoder width


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_loading_a_mismatched_checkpoint_raises(tmp_path, change):
    source = GOLDEN / "lm_a" / "checkpoint"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / name)
    weights = load_file(str(source / "model.safetensors"))
    if change == "missing":
        del weights["local_transformer_lm_heads.2.weight"]
    else:
        weights["local_transformer.extra.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    expected = "patch_decoder.heads.2.weight" if change == "missing" else "patch_decoder.extra.weight"
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        MiMoAudioForConditionalGeneration.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# parity with the original


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_prefill_matches_original_fp32(case, attn):
    model = load_model(case, attn=attn)
    for prompt in PROMPTS:
        outputs = prefill(model, case, prompt)
        for name, value in outputs.items():
            expected = golden(case)[f"fp32.{prompt}.prefill.{name}"]
            assert value.shape == expected.shape, (prompt, name)
            torch.testing.assert_close(value, expected, atol=FP32_ATOL, rtol=0, msg=f"{case} {prompt} {name}")


@pytest.mark.parametrize("case", CASES)
def test_prefill_matches_original_bf16(case):
    model = load_model(case, dtype=torch.bfloat16)
    for prompt in PROMPTS:
        outputs = prefill(model, case, prompt)
        for name, value in outputs.items():
            expected = golden(case)[f"bf16.{prompt}.prefill.{name}"]
            assert value.dtype == torch.bfloat16
            torch.testing.assert_close(
                value.float(), expected.float(), atol=BF16_ATOL[name], rtol=0, msg=f"{case} {prompt} {name}"
            )
        assert (
            outputs["text_logits"].argmax(-1).item()
            == golden(case)[f"bf16.{prompt}.prefill.text_logits"].argmax(-1).item()
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_patch_encoder_matches_original(attn):
    """`input_full_attention=False` gives a causal patch encoder in every attention implementation (quirk 4)."""
    model = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_b" / "checkpoint", attn_implementation=attn)
    model.eval()
    model.config.input_full_attention = False
    outputs = prefill(model, "lm_b", "icl")
    for name in ("inputs_embeds", "text_logits", "local_hidden_states"):
        expected = golden("lm_b")[f"fp32.icl.prefill_input_full_attention_false.{name}"]
        torch.testing.assert_close(outputs[name], expected, atol=FP32_ATOL, rtol=0, msg=name)
    # and it really differs from the bidirectional result
    bidirectional = golden("lm_b")["fp32.icl.prefill.inputs_embeds"]
    assert (outputs["inputs_embeds"] - bidirectional).abs().max() > 0.1


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_greedy_patch_matches_original(case, dtype):
    model = load_model(case, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    atol = FP32_ATOL if dtype == "fp32" else BF16_ATOL["local_logits"]
    for prompt in PROMPTS:
        expected_tokens = golden(case)[f"{dtype}.{prompt}.local_forward.tokens"]
        codes, logits = greedy_patch(model, golden(case)[f"{dtype}.{prompt}.prefill.local_hidden_states"])
        assert torch.equal(codes, expected_tokens), (prompt, codes, expected_tokens)
        for channel, channel_logits in enumerate(logits):
            expected = golden(case)[f"{dtype}.{prompt}.local_forward.logits_ch{channel}"]
            torch.testing.assert_close(channel_logits.float(), expected.float(), atol=atol, rtol=0)


def test_teacher_forcing_matches_step_by_step_decoding():
    """The training path (whole patch at once) gives the same logits as decoding the same codes step by step."""
    model = load_model("lm_a")
    hidden = golden("lm_a")["fp32.asr.prefill.backbone_last_hidden_state"][0, -1:]
    codes, logits = greedy_patch(model, model.get_patch_decoder_inputs(hidden)[:, None])
    with torch.no_grad():
        teacher_forced = model.teacher_forced_audio_logits(hidden, codes)
    for channel in range(model.config.audio_channels):
        torch.testing.assert_close(teacher_forced[channel][0], logits[channel], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# batching and attention implementations


def left_padded_batch(case, config):
    """The three prompts of a case, left-padded into one batch."""
    samples = [grid_to_inputs(golden(case)[f"{prompt}.input_ids_grid"], config) for prompt in PROMPTS]
    length = max(ids.shape[1] for ids, _ in samples)
    input_ids = torch.full((len(samples), length), 400, dtype=torch.long)
    audio = torch.tensor(config.audio_empty_ids).expand(len(samples), length, config.group_size, -1).clone()
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, (ids, codes) in enumerate(samples):
        input_ids[row, length - ids.shape[1] :] = ids[0]
        audio[row, length - ids.shape[1] :] = codes[0]
        mask[row, length - ids.shape[1] :] = 1
    return samples, input_ids, audio, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch_equals_single_samples(case, attn):
    model = load_model(case, attn=attn)
    samples, input_ids, audio, mask = left_padded_batch(case, model.config)
    with torch.no_grad():
        batched = model(input_ids=input_ids, audio_input_ids=audio, attention_mask=mask)
        for row, (ids, codes) in enumerate(samples):
            single = model(input_ids=ids, audio_input_ids=codes)
            length = ids.shape[1]
            torch.testing.assert_close(batched.logits[row, -length:], single.logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                batched.last_hidden_state[row, -length:], single.last_hidden_state[0], atol=1e-5, rtol=0
            )


def test_eager_equals_sdpa_and_cache_continuation():
    eager, sdpa = load_model("lm_b", attn="eager"), load_model("lm_b", attn="sdpa")
    input_ids, audio = grid_to_inputs(golden("lm_b")["icl.input_ids_grid"], eager.config)
    with torch.no_grad():
        full_eager = eager(input_ids=input_ids, audio_input_ids=audio)
        full_sdpa = sdpa(input_ids=input_ids, audio_input_ids=audio)
        torch.testing.assert_close(full_eager.logits, full_sdpa.logits, atol=1e-5, rtol=0)
        # prefill then one cached step gives the same last logits
        cache = DynamicCache(config=sdpa.config.text_config)
        sdpa(input_ids=input_ids[:, :-1], audio_input_ids=audio[:, :-1], cache=cache, use_cache=True)
        step = sdpa(
            input_ids=input_ids[:, -1:], audio_input_ids=audio[:, -1:], cache=cache, use_cache=True, logits_to_keep=1
        )
    assert step.cache.get_seq_length() == input_ids.shape[1]
    torch.testing.assert_close(step.logits[:, -1], full_sdpa.logits[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step.last_hidden_state[:, -1], full_sdpa.last_hidden_state[:, -1], atol=1e-5, rtol=0)


def test_text_only_input_and_input_errors():
    model = load_model("lm_a")
    config = model.config
    text_ids = torch.tensor([[401, 10, 20, 30]])
    with torch.no_grad():
        text_only = model(input_ids=text_ids)
        with_empty_audio = model(
            input_ids=text_ids,
            audio_input_ids=torch.tensor(config.audio_empty_ids).expand(1, 4, config.group_size, -1),
        )
    torch.testing.assert_close(text_only.logits, with_empty_audio.logits, atol=0, rtol=0)
    audio_ids = torch.tensor([[401, config.empty_token_id]])
    with pytest.raises(ValueError, match="audio_input_ids` is None"):
        model(input_ids=audio_ids)
    with pytest.raises(ValueError, match="audio_input_ids` must have shape"):
        model(input_ids=audio_ids, audio_input_ids=torch.zeros(1, 2, 3, 8, dtype=torch.long))
    bad_codes = torch.tensor(config.audio_empty_ids).expand(1, 2, config.group_size, -1).clone()
    bad_codes[0, 1, 0, 2] = config.audio_vocab_sizes[2]
    with pytest.raises(ValueError, match="outside the codebooks"):
        model(input_ids=audio_ids, audio_input_ids=bad_codes)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="needs `labels`"):
        model(input_ids=text_ids, audio_labels=torch.zeros(1, 4, 4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        model(input_ids=text_ids, labels=text_ids, logits_to_keep=1)


# ----------------------------------------------------------------------------------------------------------------
# training loss


def training_batch(config):
    """Two samples: text, audio spans, left padding on the second, a -100 text span and -100 audio entries."""
    torch.manual_seed(0)
    empty = config.empty_token_id
    group, channels = config.group_size, config.audio_channels
    input_ids = torch.randint(0, 400, (2, 12))
    input_ids[0, 3:7] = empty  # audio span
    input_ids[0, 9:11] = empty  # second audio span
    input_ids[1, :3] = 400  # left padding
    input_ids[1, 5:9] = empty
    empty_ids = torch.tensor(config.audio_empty_ids)
    audio = empty_ids.expand(2, 12, group, channels).clone()
    for channel, size in enumerate(config.audio_vocab_sizes):
        random_codes = torch.randint(0, size - 1, (2, 12, group))
        audio[..., channel] = torch.where((input_ids == empty)[..., None], random_codes, audio[..., channel])
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, :3] = 0
    labels = input_ids.clone()
    labels[:, :2] = -100  # prompt
    labels[1, :3] = -100  # padding
    audio_labels = audio.clone()
    audio_labels[1, :3] = -100
    audio_labels[0, 4, 1:3, 0] = -100  # ignored entries inside a trained patch
    audio_labels[0, 10] = -100  # a whole patch without audio targets: not trained
    return input_ids, audio, attention_mask, labels, audio_labels


def reference_loss(
    model, input_ids, audio, attention_mask, labels, audio_labels, text_weight=100, weights=(12, 8, 6, 4, 2, 2, 1, 1)
):
    """The official recipe written as plain loops over samples, positions, steps and codebooks."""
    config = model.config
    empty = config.empty_token_id
    group, delays = config.group_size, config.delay_pattern
    steps = group + max(delays)
    hidden = model.model(input_ids=input_ids, audio_input_ids=audio, attention_mask=attention_mask).last_hidden_state
    logits = model.lm_head(hidden)
    text_sum, text_count = 0.0, 0.0
    audio_sums = [0.0] * config.audio_channels
    patches = 0
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 1):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            weight = 0.01 if target == empty else 1.0
            text_sum = text_sum + weight * F.cross_entropy(logits[b, t], labels[b, t + 1])
            text_count += weight
            patch = audio_labels[b, t + 1]  # (group, channels)
            if target != empty or bool((patch == -100).all()):
                continue
            patches += 1
            inputs = [model.patch_decoder.input_proj(hidden[b, t])]
            for step in range(steps - 1):
                embedding = torch.zeros(config.patch_decoder_config.hidden_size)
                for channel, delay in enumerate(delays):
                    frame = step - delay
                    if 0 <= frame < group and patch[frame, channel] != -100:
                        code_embedding = model.model.audio_embeddings[channel].weight[patch[frame, channel]]
                        if model.patch_decoder.embeddings_proj is not None:
                            code_embedding = model.patch_decoder.embeddings_proj(code_embedding)
                        embedding = embedding + code_embedding
                inputs.append(embedding)
            decoded = model.patch_decoder(torch.stack(inputs)[None])[0]
            for channel, delay in enumerate(delays):
                for frame in range(group):
                    code = patch[frame, channel]
                    if code != -100:
                        channel_logits = model.patch_decoder.heads[channel](decoded[delay + frame])
                        audio_sums[channel] = audio_sums[channel] + F.cross_entropy(channel_logits, code)
    text_loss = text_sum / text_count
    audio_losses = torch.stack([torch.as_tensor(total) / (patches * group) for total in audio_sums])
    total = (text_weight * text_loss + sum(w * loss for w, loss in zip(weights, audio_losses))) / (
        text_weight + sum(weights)
    )
    return total, text_loss, audio_losses, patches


@pytest.mark.parametrize("case", CASES)
def test_loss_matches_reference_loop(case):
    model = load_model(case)
    batch = training_batch(model.config)
    with torch.no_grad():
        out = model(
            input_ids=batch[0],
            audio_input_ids=batch[1],
            attention_mask=batch[2],
            labels=batch[3],
            audio_labels=batch[4],
        )
        total, text_loss, audio_losses, patches = reference_loss(model, *batch)
    assert patches == 9  # 4 + 1 (sample 0; the position-10 patch has no targets) + 4 (sample 1)
    assert len(out.audio_logits) == 8 and out.audio_logits[2].shape == (patches, 4, model.config.audio_vocab_sizes[2])
    torch.testing.assert_close(out.text_loss, text_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.audio_loss, audio_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, total, atol=1e-5, rtol=0)


def tiny_config(**overrides):
    """A random-weight layout unlike the goldens: 3 codebooks, 3 frames per patch, unordered delays."""
    settings = {
        "text_config": {"vocab_size": 416, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8},
        "patch_encoder_config": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 2},
        "patch_decoder_config": {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
                              "num_attention_heads": 3, "num_key_value_heads": 3},
        "group_size": 3, "audio_channels": 3, "audio_vocab_sizes": [20, 11, 7], "audio_empty_ids": [19, 0, 6],
        "delay_pattern": [2, 0, 3], "empty_token_id": 405, "text_loss_weight": 10.0, "audio_loss_weights": [3.0, 2.0, 0.5],
    }  # fmt: skip
    settings.update(overrides)
    return MiMoAudioConfig(**settings)


def test_patch_on_another_layout_matches_step_by_step_reference():
    """Unordered delays [2, 0, 3], 3 frames per patch, an empty id that is not the last code: the patch `generate`
    emits and the teacher-forced logits (the training path) equal the step-by-step reference `greedy_patch`."""
    torch.manual_seed(6)
    model = MiMoAudioForConditionalGeneration(tiny_config()).eval()
    config = model.config
    input_ids = torch.randint(0, 400, (1, 6))
    input_ids[0, 2:4] = config.empty_token_id
    audio = torch.stack([torch.randint(0, size, (1, 6, config.group_size)) for size in config.audio_vocab_sizes], -1)

    class ChooseAudio(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, config.empty_token_id] = 0.0
            return forced

    with torch.no_grad():
        hidden = model(input_ids=input_ids, audio_input_ids=audio).last_hidden_state[0, -1:]
        codes, logits = greedy_patch(model, model.get_patch_decoder_inputs(hidden)[:, None])
        out = model.generate(
            input_ids, audio, max_new_tokens=1, do_sample=False, audio_do_sample=False, eos_token_id=None,
            logits_processor=LogitsProcessorList([ChooseAudio()]), return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
        teacher_forced = model.teacher_forced_audio_logits(hidden, codes)
    assert torch.equal(out.audio_sequences[0, -1], codes[0])
    assert [len(set(codes[0, :, c].tolist())) > 1 for c in range(3)] == [True] * 3  # codes vary within the patch
    for channel in range(config.audio_channels):
        torch.testing.assert_close(out.audio_logits[0][channel][0], logits[channel], atol=1e-5, rtol=0)
        torch.testing.assert_close(teacher_forced[channel][0], logits[channel], atol=1e-5, rtol=0)


def test_loss_matches_reference_loop_on_another_layout():
    torch.manual_seed(3)
    model = MiMoAudioForConditionalGeneration(tiny_config()).eval()
    assert model.patch_decoder.embeddings_proj is None  # widths coincide here
    config = model.config
    input_ids = torch.randint(0, 400, (2, 9))
    input_ids[:, 2:5] = config.empty_token_id
    input_ids[1, 7:9] = config.empty_token_id
    audio = torch.stack(
        [torch.randint(0, size, (2, 9, config.group_size)) for size in config.audio_vocab_sizes], dim=-1
    )
    labels, audio_labels = input_ids.clone(), audio.clone()
    labels[0, :2] = -100
    audio_labels[1, 3, 1, :] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, audio_input_ids=audio, labels=labels, audio_labels=audio_labels)
        total, text_loss, audio_losses, patches = reference_loss(
            model, input_ids, audio, None, labels, audio_labels, text_weight=10.0, weights=(3.0, 2.0, 0.5)
        )
    assert patches == 8 and out.audio_logits[1].shape == (8, 3, 11)  # 3 + 5 audio positions
    torch.testing.assert_close(out.text_loss, text_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.audio_loss, audio_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, total, atol=1e-5, rtol=0)


def test_another_layout_batches_and_attention_implementations():
    """Left-padded batch == single samples, eager == sdpa, and the causal/bidirectional patch encoder switch."""
    torch.manual_seed(4)
    config = tiny_config(input_full_attention=False)
    model = MiMoAudioForConditionalGeneration(config).eval()
    input_ids = torch.randint(0, 400, (1, 7))
    input_ids[0, 2:6] = config.empty_token_id
    audio = torch.stack([torch.randint(0, size, (1, 7, 3)) for size in config.audio_vocab_sizes], dim=-1)
    padded_ids = torch.cat([torch.full((1, 3), 400), input_ids], dim=1)
    padded_audio = torch.cat([audio[:, :3], audio], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    outputs = {}
    for attn in ("eager", "sdpa"):
        model.set_attn_implementation(attn)
        assert model.config.patch_encoder_config._attn_implementation == attn
        with torch.no_grad():
            single = model(input_ids=input_ids, audio_input_ids=audio).logits
            padded = model(input_ids=padded_ids, audio_input_ids=padded_audio, attention_mask=mask).logits
            model.config.input_full_attention = True
            bidirectional = model(input_ids=input_ids, audio_input_ids=audio).logits
            model.config.input_full_attention = False
        torch.testing.assert_close(padded[:, 3:], single, atol=1e-5, rtol=0)
        assert (bidirectional - single).abs().max() > 1e-3
        outputs[attn] = (single, bidirectional)
    torch.testing.assert_close(outputs["eager"][0], outputs["sdpa"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["eager"][1], outputs["sdpa"][1], atol=1e-5, rtol=0)


def test_loss_without_audio_targets_is_the_text_loss():
    model = load_model("lm_a")
    input_ids, audio, attention_mask, labels, _ = training_batch(model.config)
    with torch.no_grad():
        text_only = model(input_ids=input_ids, audio_input_ids=audio, attention_mask=attention_mask, labels=labels)
        no_targets = model(
            input_ids=input_ids,
            audio_input_ids=audio,
            attention_mask=attention_mask,
            labels=labels,
            audio_labels=torch.full_like(audio, -100),
        )
        _, reference_text, _, _ = reference_loss(
            model, input_ids, audio, attention_mask, labels, torch.full_like(audio, -100)
        )
    for out in (text_only, no_targets):
        assert out.audio_loss is None and out.audio_logits is None
        torch.testing.assert_close(out.loss, reference_text, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.loss, out.text_loss, atol=0, rtol=0)


def test_gradients_reach_every_trainable_module():
    model = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_a" / "checkpoint")
    model.train()
    input_ids, audio, attention_mask, labels, audio_labels = training_batch(model.config)
    out = model(
        input_ids=input_ids,
        audio_input_ids=audio,
        attention_mask=attention_mask,
        labels=labels,
        audio_labels=audio_labels,
    )
    out.loss.backward()
    without_gradient = [
        name for name, param in model.named_parameters() if param.grad is None or param.grad.abs().sum() == 0
    ]
    assert without_gradient == []


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = training_batch(MiMoAudioConfig.from_pretrained(GOLDEN / "lm_b" / "checkpoint"))
    gradients = []
    for checkpointing in (False, True):
        model = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_b" / "checkpoint")
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.patch_decoder.layers[0].gradient_checkpointing
            assert model.model.patch_encoder.layers[0].gradient_checkpointing
        model.train()
        torch.manual_seed(1)  # same dropout masks in both runs
        out = model(
            input_ids=batch[0],
            audio_input_ids=batch[1],
            attention_mask=batch[2],
            labels=batch[3],
            audio_labels=batch[4],
        )
        out.loss.backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-5, rtol=1e-4, msg=name)


def test_audio_generation_settings_survive_save_and_reload(tmp_path):
    """A model built from its config has a generation config "from the model config"; Transformers would drop the
    unknown `audio_*` keys on reload unless `save_pretrained` writes it as a standalone one."""
    model = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_b" / "checkpoint")
    model.generation_config.audio_temperature = 0.7
    model.generation_config.audio_top_k = 5
    model.save_pretrained(tmp_path)
    reloaded = MiMoAudioForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.generation_config.audio_temperature == 0.7 and reloaded.generation_config.audio_top_k == 5


# ------------------------------------------------------------------------------------------ output recording


def recording_model(input_full_attention=False):
    """A tiny eager model (attention weights are returned) with two layers in every transformer."""
    torch.manual_seed(5)
    config = tiny_config(
        input_full_attention=input_full_attention,
        patch_encoder_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "num_key_value_heads": 2},
    )  # fmt: skip
    config._attn_implementation = "eager"
    return MiMoAudioForConditionalGeneration(config).eval()


def manual_attention_weights(layer, hidden_states, causal):
    """Softmax attention weights of a Qwen2 layer's self-attention, computed by hand over `(batch, steps, width)`."""
    attention = layer.self_attn
    batch, steps, _ = hidden_states.shape
    normed = layer.input_layernorm(hidden_states)
    query = attention.q_proj(normed).view(batch, steps, -1, attention.head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, steps, -1, attention.head_dim).transpose(1, 2)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    inverse_frequencies = 1.0 / (
        attention.config.rope_parameters["rope_theta"]
        ** (torch.arange(0, attention.head_dim, 2, dtype=torch.float) / attention.head_dim)
    )
    angles = torch.arange(steps, dtype=torch.float)[:, None] * inverse_frequencies[None]
    cos, sin = torch.cat([angles, angles], dim=-1).cos(), torch.cat([angles, angles], dim=-1).sin()

    def rotate(x):
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin

    scores = rotate(query) @ rotate(key).transpose(-1, -2) * attention.head_dim**-0.5
    if causal:
        scores = scores.masked_fill(torch.ones(steps, steps, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(dim=-1)


@pytest.mark.parametrize("input_full_attention", [False, True])
def test_output_attentions_and_hidden_states_per_transformer(input_full_attention):
    """Backbone, patch encoder and teacher-forced patch decoder each report their own layers: counts, shapes, and the
    values of a hand computation (first layer's attention weights, last layer's output through the final norm)."""
    model = recording_model(input_full_attention)
    config = model.config
    input_ids, audio, attention_mask, labels, audio_labels = training_batch(config)
    input_ids, audio, labels, audio_labels = input_ids[:, :10], audio[:, :10], labels[:, :10], audio_labels[:, :10]
    attention_mask = attention_mask[:, :10]
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            audio_input_ids=audio,
            attention_mask=attention_mask,
            labels=labels,
            audio_labels=audio_labels,
            output_attentions=True,
            output_hidden_states=True,
        )
    text, encoder, decoder = config.text_config, config.patch_encoder_config, config.patch_decoder_config
    batch, seq_len = input_ids.shape
    assert len(out.attentions) == text.num_hidden_layers and len(out.hidden_states) == text.num_hidden_layers + 1
    assert {tuple(a.shape) for a in out.attentions} == {(batch, text.num_attention_heads, seq_len, seq_len)}
    assert {tuple(h.shape) for h in out.hidden_states} == {(batch, seq_len, text.hidden_size)}
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)

    # patch encoder: the patches of the audio positions, in row-major order
    is_audio = input_ids == config.empty_token_id
    patches = int(is_audio.sum())
    group = config.group_size
    assert len(out.patch_encoder_attentions) == len(out.patch_encoder_hidden_states) == encoder.num_hidden_layers
    assert {tuple(a.shape) for a in out.patch_encoder_attentions} == {
        (patches, encoder.num_attention_heads, group, group)
    }
    assert {tuple(h.shape) for h in out.patch_encoder_hidden_states} == {(patches, group, encoder.hidden_size)}
    patch_encoder = model.model.patch_encoder
    with torch.no_grad():
        frames = model.model.embed_audio_frames(audio[is_audio])
        expected = manual_attention_weights(patch_encoder.layers[0], frames, causal=not input_full_attention)
        torch.testing.assert_close(out.patch_encoder_attentions[0], expected, atol=1e-5, rtol=1e-5)
        expected = manual_attention_weights(
            patch_encoder.layers[1], out.patch_encoder_hidden_states[0], causal=not input_full_attention
        )
        torch.testing.assert_close(out.patch_encoder_attentions[1], expected, atol=1e-5, rtol=1e-5)
        projected = patch_encoder.proj(patch_encoder.norm(out.patch_encoder_hidden_states[-1]).reshape(patches, -1))
        torch.testing.assert_close(
            projected, model.model.get_inputs_embeds(input_ids, audio)[is_audio], atol=1e-5, rtol=0
        )

    # patch decoder: the patches with an audio target, teacher-forced over all the steps
    trained = int(out.audio_logits[0].shape[0])
    steps = config.patch_decoder_steps
    assert trained > 0
    assert len(out.patch_decoder_attentions) == len(out.patch_decoder_hidden_states) == decoder.num_hidden_layers
    assert {tuple(a.shape) for a in out.patch_decoder_attentions} == {
        (trained, decoder.num_attention_heads, steps, steps)
    }
    assert {tuple(h.shape) for h in out.patch_decoder_hidden_states} == {(trained, steps, decoder.hidden_size)}
    patch_decoder = model.patch_decoder
    with torch.no_grad():
        final = patch_decoder.norm(out.patch_decoder_hidden_states[-1])
        for channel, delay in enumerate(config.delay_pattern):
            logits = model.get_audio_logits(final[:, delay : delay + group], channel)
            torch.testing.assert_close(logits, out.audio_logits[channel], atol=1e-5, rtol=0)
        # the second layer's attention, by hand from the first layer's output
        expected = manual_attention_weights(patch_decoder.layers[1], out.patch_decoder_hidden_states[0], causal=True)
        torch.testing.assert_close(out.patch_decoder_attentions[1], expected, atol=1e-5, rtol=1e-5)


def test_outputs_are_recorded_only_on_request_and_hooks_stay_single():
    """Nothing is recorded (and no hook installed) without a request; whatever the order of the calls (the base model
    first, then the head), every layer carries at most one recording hook and the counts stay right; the patch
    decoder called directly (as generation does) records nothing and computes the same."""
    model = recording_model()
    config = model.config
    input_ids, audio, attention_mask, labels, audio_labels = training_batch(config)
    layers = [*model.model.language_model.layers, *model.model.patch_encoder.layers, *model.patch_decoder.layers]
    with torch.no_grad():
        plain = model(input_ids=input_ids, audio_input_ids=audio, labels=labels, audio_labels=audio_labels)
        assert all(getattr(plain, name) is None for name in ("attentions", "hidden_states", "patch_encoder_attentions",
                                                              "patch_encoder_hidden_states", "patch_decoder_attentions",
                                                              "patch_decoder_hidden_states"))  # fmt: skip
        assert not any(layer._forward_hooks or layer.self_attn._forward_hooks for layer in layers)

        base = model.model(input_ids=input_ids, audio_input_ids=audio, output_attentions=True)
        assert len(base.attentions) == config.text_config.num_hidden_layers
        assert len(base.patch_encoder_attentions) == config.patch_encoder_config.num_hidden_layers
        recorded = model(
            input_ids=input_ids,
            audio_input_ids=audio,
            labels=labels,
            audio_labels=audio_labels,
            output_attentions=True,
            output_hidden_states=True,
        )
        assert len(recorded.attentions) == config.text_config.num_hidden_layers
        assert len(recorded.patch_encoder_attentions) == config.patch_encoder_config.num_hidden_layers
        assert len(recorded.patch_decoder_attentions) == config.patch_decoder_config.num_hidden_layers
        assert all(len(layer.self_attn._forward_hooks) <= 1 and len(layer._forward_hooks) <= 1 for layer in layers)
        torch.testing.assert_close(recorded.loss, plain.loss, atol=0, rtol=0)

        without_audio_labels = model(input_ids=input_ids, audio_input_ids=audio, output_attentions=True)
        assert without_audio_labels.patch_decoder_attentions is None  # the patch decoder did not run
        assert len(without_audio_labels.patch_encoder_attentions) == config.patch_encoder_config.num_hidden_layers

        inputs = model.get_patch_decoder_inputs(plain.last_hidden_state[:, :2])
        expected = model.patch_decoder(inputs)
        as_tuple = model(input_ids=input_ids, audio_input_ids=audio, return_dict=False, output_attentions=True)
        assert torch.equal(model.patch_decoder(inputs), expected)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)
