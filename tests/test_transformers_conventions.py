"""Transformers conventions the common test mixins check (issue 17), as tests of this project: loading (missing and
unexpected weights reported, base <-> head checkpoints), the codec's `return_dict` and deterministic buffer init, and
the tensor-parallel plan of the tied head. See docs/architecture.md ("Transformers conformance") for how the upstream
common suites are run against this package."""

import copy
import inspect

import pytest
import torch
from conftest import GOLDEN
from safetensors.torch import load_file, save_file
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from transformers_mimo import (
    MiMoAudioConfig,
    MiMoAudioForConditionalGeneration,
    MiMoAudioModel,
    MiMoAudioTokenizerConfig,
    MiMoAudioTokenizerModel,
)


@pytest.fixture(scope="module")
def lm_config():
    return MiMoAudioConfig.from_pretrained(GOLDEN / "lm_b" / "checkpoint")


@pytest.fixture(scope="module")
def codec_config():
    return MiMoAudioTokenizerConfig.from_pretrained(GOLDEN / "tok_b" / "checkpoint")


def test_head_checkpoint_loads_into_base_model_and_back(tmp_path, lm_config):
    torch.manual_seed(0)
    full = MiMoAudioForConditionalGeneration(lm_config)
    full.save_pretrained(tmp_path / "full")
    base, info = MiMoAudioModel.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert info["missing_keys"] == set()
    assert {key.split(".")[0] for key in info["unexpected_keys"]} == {"lm_head", "patch_decoder"}
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, full.model.state_dict()[name]), name

    base.save_pretrained(tmp_path / "base")
    logger = logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(logger) as captured:
        head, info = MiMoAudioForConditionalGeneration.from_pretrained(tmp_path / "base", output_loading_info=True)
    missing = set(info["missing_keys"])
    expected = {name for name in full.state_dict() if name.startswith(("lm_head.", "patch_decoder."))}
    assert missing == expected and len(missing) == 35 and info["unexpected_keys"] == set()
    assert "patch_decoder.input_proj.weight" in captured.out  # reported, not silent
    assert torch.equal(head.model.audio_embeddings[3].weight, full.model.audio_embeddings[3].weight)
    assert torch.isfinite(head.patch_decoder.input_proj.weight).all()  # initialised


def test_own_checkpoint_with_missing_and_unexpected_weights_loads_with_report(tmp_path, lm_config):
    torch.manual_seed(0)
    MiMoAudioForConditionalGeneration(lm_config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["patch_decoder.heads.2.weight"]
    weights["patch_decoder.surprise.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = MiMoAudioForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"patch_decoder.heads.2.weight"}
    assert set(info["unexpected_keys"]) == {"patch_decoder.surprise.weight"}
    assert model.patch_decoder.heads[2].weight.abs().sum() > 0


def test_save_original_format_writes_the_original_key_names_back(tmp_path):
    """As upstream's test_reverse_loading_mapping: saving with `save_original_format=True` reverts the registered
    mapping, giving back exactly the original checkpoint's tensor names (and loading them again gives the same
    weights). The default stays this package's layout."""
    original_dir = GOLDEN / "lm_b" / "checkpoint"
    model = MiMoAudioForConditionalGeneration.from_pretrained(original_dir)
    model.save_pretrained(tmp_path / "original", save_original_format=True)
    saved = load_file(tmp_path / "original" / "model.safetensors")
    assert set(saved) == set(load_file(original_dir / "model.safetensors"))
    assert torch.equal(saved["hidden_states_downcast.weight"], model.patch_decoder.input_proj.weight)
    assert torch.equal(saved["local_transformer_lm_heads.2.weight"], model.patch_decoder.heads[2].weight)
    reloaded, info = MiMoAudioForConditionalGeneration.from_pretrained(tmp_path / "original", output_loading_info=True)
    assert not any(info.values())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    model.save_pretrained(tmp_path / "default")
    prefixes = {key.split(".")[0] for key in load_file(tmp_path / "default" / "model.safetensors")}
    assert prefixes == {"lm_head", "model", "patch_decoder"}
    # a patch decoder wider than the audio embeddings has `embeddings_proj` (lm_b has none)
    config = copy.deepcopy(model.config)
    config.patch_decoder_config.hidden_size *= 2
    MiMoAudioForConditionalGeneration(config).save_pretrained(tmp_path / "wide", save_original_format=True)
    prefixes = {key.split(".")[0] for key in load_file(tmp_path / "wide" / "model.safetensors")}
    assert {"speech_embeddings_to_local", "hidden_states_downcast", "local_transformer_lm_heads"} <= prefixes
    assert "patch_decoder" not in prefixes


def test_codec_own_checkpoint_reports_missing_weights(tmp_path, codec_config):
    torch.manual_seed(0)
    MiMoAudioTokenizerModel(codec_config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["decoder.vocoder.head.out.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = MiMoAudioTokenizerModel.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"decoder.vocoder.head.out.bias"}


def test_codec_forward_return_dict(codec_config):
    torch.manual_seed(0)
    model = MiMoAudioTokenizerModel.from_pretrained(GOLDEN / "tok_b" / "checkpoint").eval()
    features = torch.randn(2, codec_config.n_mels, 64)
    with torch.no_grad():
        as_dict = model(features, return_dict=True)
        as_tuple = model(features, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4
    for value, expected in zip(as_tuple, as_dict.values()):
        assert torch.equal(value, expected)
    assert as_tuple[0].shape == (2, codec_config.num_quantizers, 16)
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(features), tuple)


def test_codec_codebook_buffers_initialise_deterministically(codec_config):
    with torch.device("meta"):
        model = MiMoAudioTokenizerModel(codec_config)
    model.to_empty(device="cpu")
    model.init_weights()
    embeds = [layer.embed for layer in model.quantizer.layers]
    assert all(torch.equal(embed, torch.zeros_like(embed)) for embed in embeds)
    assert [tuple(embed.shape) for embed in embeds][:3] == [(32, 48), (32, 48), (8, 48)]


def test_tensor_parallel_plan_shards_tied_head_with_embeddings(lm_config):
    model = MiMoAudioForConditionalGeneration(lm_config)
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert "model.language_model.embed_tokens" in model.tp_plan


def test_generate_as_the_generation_tester_mixin_calls_it():
    """The calls of Transformers' GenerationTesterMixin (greedy, sample with num_return_sequences, logits_to_keep,
    explicit position_ids, no input_ids): the plain `sequences` tensor with `return_dict_in_generate=False`."""
    model = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_b" / "checkpoint").eval()
    input_ids = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    greedy = {"do_sample": False, "max_new_tokens": 3, "min_new_tokens": 3, "return_dict_in_generate": False}
    output = model.generate(input_ids, attention_mask=attention_mask, **greedy)
    assert isinstance(output, torch.Tensor) and output.shape == (2, 10)
    assert torch.equal(output[:, :7], input_ids)
    kept = model.generate(input_ids, attention_mask=attention_mask, logits_to_keep=0, **greedy)
    positions = model.generate(
        input_ids, attention_mask=attention_mask, position_ids=attention_mask.cumsum(-1) - 1, **greedy
    )
    assert torch.equal(kept, output) and torch.equal(positions, output)
    torch.manual_seed(0)
    sampled = model.generate(
        input_ids, attention_mask=attention_mask, do_sample=True, max_new_tokens=3, min_new_tokens=3,
        num_return_sequences=2, return_dict_in_generate=False,
    )  # fmt: skip
    assert sampled.shape == (4, 10) and torch.equal(sampled[::2, :7], input_ids)
    assert model.generate(do_sample=False, max_new_tokens=2, min_new_tokens=2).sequences.shape == (1, 3)


def test_auto_docstrings_render_without_undocumented_arguments():
    """`@auto_docstring` prints an `[ERROR]` line at import for every undocumented argument; none may appear, and the
    rendered docs carry this package's argument docs (not placeholders of a model it cannot name out of tree)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import transformers_mimo"], capture_output=True, text=True, check=True
    )
    assert "[ERROR]" not in result.stdout + result.stderr
    from transformers_mimo import MiMoAudioPatchDecoderConfig

    rendered = {
        MiMoAudioConfig: "    empty_token_id (`int`, *optional*, defaults to 151667):",
        MiMoAudioPatchDecoderConfig: "    num_hidden_layers (`int`, *optional*, defaults to `16`):",
        MiMoAudioTokenizerConfig: "    vocoder_attn_window_size (`list[int]`, *optional*, defaults to `[40, 10]`):",
        MiMoAudioModel.forward: "            audio_input_ids (`torch.LongTensor` of shape",
        MiMoAudioForConditionalGeneration.forward: "            audio_labels (`torch.LongTensor` of shape",
        MiMoAudioTokenizerModel.forward: "            num_quantizers (`int`, *optional*):",
    }
    for obj, line in rendered.items():
        assert line in obj.__doc__, obj
        assert "None" not in obj.__doc__.split("Args:")[0], obj  # the intro names no unknown model


# GenerationTesterMixin (tests/generation/test_utils.py) is not in the transformers sdist, so the tests below redo the
# calls of its tests that failed before issue 17, on a model built from the config as the mixin builds it (no stop
# token, batch of 2, its logits-processor and sampling arguments). benchmarks/transformers_common/run.sh runs the mixin
# itself when given the file (see docs/architecture.md, "Transformers conformance").
MIXIN_PROCESSING = {"bad_words_ids": [[1, 0]], "repetition_penalty": 1.2, "remove_invalid_values": True}
MIXIN_SAMPLING = {"top_k": 10, "top_p": 0.7, "temperature": 0.7}


@pytest.fixture(scope="module")
def generator(lm_config):
    config = copy.deepcopy(lm_config)
    config.text_config.eos_token_id = None
    torch.manual_seed(0)
    return MiMoAudioForConditionalGeneration(config).eval()


@pytest.fixture
def prompt():
    input_ids = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def test_greedy_generate_returns_the_sequences_tensor_whatever_the_output_flags(generator, prompt):
    """As test_greedy_generate: with `return_dict_in_generate=False`, the `(batch, prompt + max_new_tokens)` tensor,
    also when scores, logits, attentions and hidden states are asked for (a dict-only request, ignored)."""
    greedy = {"do_sample": False, "num_beams": 1, "max_new_tokens": 3, "return_dict_in_generate": False}
    output = generator.generate(**prompt, **greedy, **MIXIN_PROCESSING)
    assert isinstance(output, torch.Tensor) and output.shape == (2, 7 + 3)
    assert torch.equal(output[:, :7], prompt["input_ids"])
    flags = {"output_scores": True, "output_logits": True, "output_attentions": True, "output_hidden_states": True}
    flagged = generator.generate(**prompt, **greedy, **MIXIN_PROCESSING, **flags, use_cache=False)
    assert isinstance(flagged, torch.Tensor) and torch.equal(flagged, output)


def test_greedy_generate_dict_outputs_with_and_without_cache(generator, prompt):
    """As test_greedy_generate_dict_outputs(_use_cache): the dict output holds one score / logits row per new token and
    the same sequences as the tensor output."""
    greedy = {"do_sample": False, "max_new_tokens": 3, **MIXIN_PROCESSING}
    expected = generator.generate(**prompt, **greedy, return_dict_in_generate=False)
    vocab_size = generator.config.text_config.vocab_size
    for use_cache in (False, True):
        output = generator.generate(
            **prompt, **greedy, return_dict_in_generate=True, output_scores=True, output_logits=True,
            output_hidden_states=True, use_cache=use_cache,
        )  # fmt: skip
        assert torch.equal(output.sequences, expected)
        assert output.audio_sequences.shape == (2, 10, generator.config.group_size, generator.config.audio_channels)
        assert len(output.scores) == len(output.logits) == len(output.hidden_states) == 3
        assert all(score.shape == (2, vocab_size) for score in output.scores + output.logits)
        assert output.hidden_states[0][-1].shape[:2] == (2, 7)  # the prompt's, then one position per step
        assert output.hidden_states[1][-1].shape[:2] == ((2, 1) if use_cache else (2, 8))


def test_sample_generate_is_seeded_and_repeats_the_prompt_per_sequence(generator, prompt):
    """As test_sample_generate: sampling with the mixin's warpers gives the `(batch * num_return_sequences,
    prompt + max_new_tokens)` tensor, the same for the same seed."""
    sample = {"do_sample": True, "max_new_tokens": 3, "return_dict_in_generate": False, **MIXIN_PROCESSING}
    torch.manual_seed(0)
    first = generator.generate(**prompt, **sample, **MIXIN_SAMPLING, num_return_sequences=1)
    torch.manual_seed(0)
    again = generator.generate(**prompt, **sample, **MIXIN_SAMPLING, num_return_sequences=1)
    assert first.shape == (2, 10) and torch.equal(first, again)
    torch.manual_seed(0)
    several = generator.generate(**prompt, **sample, **MIXIN_SAMPLING, num_return_sequences=3)
    assert several.shape == (6, 10)
    assert torch.equal(several[:, :7], prompt["input_ids"].repeat_interleave(3, dim=0))


def test_generate_methods_with_logits_to_keep(generator, prompt):
    """As the upstream test: `forward` takes `logits_to_keep`; keeping every position's logits (0) generates what the
    default (last position only) does, in the tensor and in the dict output (text and audio)."""
    assert "logits_to_keep" in inspect.signature(MiMoAudioForConditionalGeneration.forward).parameters
    greedy = {"max_new_tokens": 10, "do_sample": False}
    with_all = generator.generate(**prompt, **greedy, logits_to_keep=0, return_dict_in_generate=False)
    without_all = generator.generate(**prompt, **greedy, return_dict_in_generate=False)
    assert with_all.shape == (2, 17) and with_all.tolist() == without_all.tolist()
    with_all_dict = generator.generate(**prompt, **greedy, logits_to_keep=0, return_dict_in_generate=True)
    without_all_dict = generator.generate(**prompt, **greedy, return_dict_in_generate=True)
    assert torch.equal(with_all_dict.sequences, with_all)
    assert torch.equal(with_all_dict.audio_sequences, without_all_dict.audio_sequences)


def test_generate_with_and_without_position_ids_on_a_left_padded_batch(generator, prompt):
    """As the upstream test: positions inferred from a left-padded attention mask, passed explicitly, generate the
    same sequences."""
    attention_mask = prompt["attention_mask"].clone()
    attention_mask[0, :3] = 0
    inputs = {"input_ids": prompt["input_ids"], "attention_mask": attention_mask}
    greedy = {"max_new_tokens": 5, "use_cache": True, "do_sample": False, "return_dict_in_generate": False}
    without_positions = generator.generate(**inputs, **greedy)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    with_positions = generator.generate(**inputs, **greedy, position_ids=position_ids)
    assert without_positions.shape == (2, 12) and without_positions.tolist() == with_positions.tolist()
    # the padded row generates what it generates alone
    alone = generator.generate(prompt["input_ids"][:1, 3:], **greedy)
    assert torch.equal(without_positions[0, 7:], alone[0, 4:])


def test_default_output_is_the_generation_configs_choice(tmp_path, generator, prompt):
    """As upstream's test_generate_methods_with_logits_to_keep reads it: a model built from a config returns the
    `sequences` tensor by default, also after a save and reload; an original checkpoint (converted on load) and one
    whose saved generation config asks for it return the dict with `audio_sequences`."""
    greedy = {"max_new_tokens": 2, "do_sample": False}
    default = generator.generate(**prompt, **greedy)
    assert isinstance(default, torch.Tensor) and default.shape == (2, 9)
    assert default.tolist() == generator.generate(**prompt, **greedy, return_dict_in_generate=False).tolist()
    generator.save_pretrained(tmp_path / "from_config")
    reloaded = MiMoAudioForConditionalGeneration.from_pretrained(tmp_path / "from_config").eval()
    assert not reloaded.generation_config.return_dict_in_generate
    assert torch.equal(reloaded.generate(**prompt, **greedy), default)

    original = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_b" / "checkpoint").eval()
    output = original.generate(**prompt, **greedy)
    assert output.sequences.shape == (2, 9)
    assert output.audio_sequences.shape == (2, 9, original.config.group_size, original.config.audio_channels)
    original.save_pretrained(tmp_path / "saved")
    saved = MiMoAudioForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(saved.generate(**prompt, **greedy).audio_sequences, output.audio_sequences)


def test_generate_without_input_ids_starts_from_bos(generator):
    """As test_generate_without_input_ids: no prompt starts from the generation config's `bos_token_id`, else
    `<|im_start|>`."""
    greedy = {"do_sample": False, "max_new_tokens": 3, "remove_invalid_values": True, "return_dict_in_generate": False}
    output = generator.generate(**greedy)
    assert generator.generation_config.bos_token_id is None
    assert output.shape == (1, 4) and output[0, 0] == generator.config.im_start_token_id
    assert generator.generate(**greedy, bos_token_id=7)[0, 0] == 7
