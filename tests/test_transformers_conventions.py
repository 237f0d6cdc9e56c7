"""Transformers conventions the common test mixins check (issue 17), as tests of this project: loading (missing and
unexpected weights reported, base <-> head checkpoints), the codec's `return_dict` and deterministic buffer init, and
the tensor-parallel plan of the tied head. See docs/architecture.md ("Transformers conformance") for how the upstream
common suites are run against this package."""

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
