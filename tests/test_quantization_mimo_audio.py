"""bitsandbytes 4-bit (nf4, fp4 + double quant) and 8-bit loading of MiMoAudioForConditionalGeneration on CPU: only the
LLM's linear layers are quantized (docs/quantization.md has the measurements behind that split), forward stays close
to fp32, generate emits valid ids, pre-quantized checkpoints save and reload exactly. Optional torchao int8 path."""

import importlib.util

import bitsandbytes as bnb
import pytest
import torch
from conftest import GOLDEN
from torch import nn
from transformers import BitsAndBytesConfig

from transformers_mimo import QUANTIZATION_SKIP_MODULES, UNQUANTIZED_MODULES, MiMoAudioForConditionalGeneration


MODES = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4_double_quant": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.float32,
    },
    "int8": {"load_in_8bit": True},
}
# Text logits vs fp32 on the lm_a model (measured: relative L2 error 0.165 nf4, 0.218 fp4+dq, 0.016 int8; mean KL
# 0.020, 0.042, 0.0002). Bounds leave ~1.5-2x headroom; the lower bound shows the weights really were quantized.
TOLERANCE = {
    "nf4": {"relative": 0.3, "kl": 0.05},
    "fp4_double_quant": {"relative": 0.35, "kl": 0.1},
    "int8": {"relative": 0.03, "kl": 1e-3},
}
QUANTIZED_LINEAR = {"nf4": bnb.nn.Linear4bit, "fp4_double_quant": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """lm_a converted to this package's layout (what `from_pretrained(..., quantization_config=...)` reads)."""
    path = tmp_path_factory.mktemp("lm_a_hf")
    MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_a" / "checkpoint").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    return MiMoAudioForConditionalGeneration.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def inputs(reference):
    """Two rows of 20 positions with text and two audio segments (random codes, seeded)."""
    config = reference.config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 400, (2, 20), generator=generator)
    input_ids[:, 5:9] = config.empty_token_id
    input_ids[:, 14:17] = config.empty_token_id
    audio = torch.tensor(config.audio_empty_ids).expand(2, 20, config.group_size, config.audio_channels).clone()
    sizes = torch.tensor(config.audio_vocab_sizes)
    codes = (torch.rand(audio.shape, generator=generator) * (sizes - 1)).long()
    is_audio = input_ids == config.empty_token_id
    audio[is_audio] = codes[is_audio]
    return {"input_ids": input_ids, "audio_input_ids": audio, "labels": input_ids, "audio_labels": audio}


def _load(checkpoint, mode, model_class=MiMoAudioForConditionalGeneration, **config_kwargs):
    config = BitsAndBytesConfig(**MODES[mode], **config_kwargs)
    return model_class.from_pretrained(checkpoint, quantization_config=config, device_map="cpu").eval()


def _assert_llm_only_quantized(model, mode):
    """Every LLM projection is quantized; every other linear layer and every embedding is a plain float module."""
    quantized_class = QUANTIZED_LINEAR[mode]
    llm_linears = 0
    for name, module in model.named_modules():
        if name.startswith("model.language_model.layers.") and isinstance(module, nn.Linear):
            assert isinstance(module, quantized_class), name
            llm_linears += 1
        elif isinstance(module, nn.Linear):
            assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
            assert any(name.startswith(prefix) for prefix in (*UNQUANTIZED_MODULES, "lm_head")), name
        elif isinstance(module, nn.Embedding):
            assert module.weight.dtype == torch.float32, name
    assert llm_linears == 7 * model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("mode", list(MODES))
def test_quantized_load_forward_generate(checkpoint, reference, inputs, mode):
    model = _load(checkpoint, mode)
    _assert_llm_only_quantized(model, mode)
    assert model.get_memory_footprint() < reference.get_memory_footprint()

    with torch.no_grad():
        expected = reference(**inputs)
        output = model(**inputs)
    relative = ((output.logits - expected.logits).norm() / expected.logits.norm()).item()
    kl = (
        nn.functional.kl_div(
            output.logits.log_softmax(-1), expected.logits.log_softmax(-1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
        .item()
    )
    assert 1e-3 < relative < TOLERANCE[mode]["relative"], relative
    assert kl < TOLERANCE[mode]["kl"], kl
    for got, want in zip(output.audio_logits, expected.audio_logits):
        assert ((got - want).norm() / want.norm()).item() < TOLERANCE[mode]["relative"]
    assert torch.isfinite(output.loss) and abs(output.loss.item() - expected.loss.item()) < 0.1 * expected.loss.item()

    config = model.config
    torch.manual_seed(0)
    generated = model.generate(
        inputs["input_ids"],
        audio_input_ids=inputs["audio_input_ids"],
        max_new_tokens=10,
        do_sample=True,
        eos_token_id=None,
    )
    new_text = generated.sequences[:, 20:]
    new_audio = generated.audio_sequences[:, 20:]
    assert new_text.shape == (2, 10) and new_audio.shape == (2, 10, config.group_size, config.audio_channels)
    assert ((new_text >= 0) & (new_text < config.text_config.vocab_size)).all()
    is_audio = new_text == config.empty_token_id
    sizes, empty = torch.tensor(config.audio_vocab_sizes), torch.tensor(config.audio_empty_ids)
    assert ((new_audio[is_audio] >= 0) & (new_audio[is_audio] < sizes) & (new_audio[is_audio] != empty)).all()
    assert (new_audio[~is_audio] == empty).all()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("after_inference", [False, True])
def test_pre_quantized_save_and_reload(checkpoint, inputs, mode, after_inference, tmp_path):
    """Saved right after loading or after a forward pass, reloaded from the pre-quantized directory without
    `quantization_config`: the same modules are quantized and the logits are identical. (On CPUs with AVX512-BF16,
    bitsandbytes 0.50 repacks 4-bit weights for its CPU kernel at the first forward pass; `save_pretrained` unpacks
    them with the block scales restored.)"""
    model = _load(checkpoint, mode)
    if after_inference:
        with torch.no_grad():
            before_save = model(**inputs)
        if mode != "int8" and bnb.functional.has_avx512bf16():  # the case this checks: weights repacked for the CPU
            assert all(
                module.weight.quant_state.packing_format_for_cpu
                for module in model.modules()
                if isinstance(module, bnb.nn.Linear4bit)
            )
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**inputs)
    if after_inference:  # saving does not change the model in memory
        assert torch.equal(expected.logits, before_save.logits)
    reloaded = MiMoAudioForConditionalGeneration.from_pretrained(tmp_path, device_map="cpu").eval()
    assert reloaded.config.quantization_config.quant_method == "bitsandbytes"
    _assert_llm_only_quantized(reloaded, mode)
    with torch.no_grad():
        output = reloaded(**inputs)
    assert torch.equal(output.logits, expected.logits)
    for got, want in zip(output.audio_logits, expected.audio_logits):
        assert torch.equal(got, want)


def test_skip_list_for_a_class_without_the_declaration(checkpoint, inputs):
    """`llm_int8_skip_modules=QUANTIZATION_SKIP_MODULES` gives the same split on the plain model class, and the same
    logits as the declaring class; Transformers' own default (no declaration, no skip list) would quantize the patch
    transformers and all codebook heads but the last one."""
    explicit = _load(
        checkpoint, "nf4", MiMoAudioForConditionalGeneration, llm_int8_skip_modules=list(QUANTIZATION_SKIP_MODULES)
    )
    _assert_llm_only_quantized(explicit, "nf4")
    with torch.no_grad():
        torch.testing.assert_close(
            explicit(**inputs).logits, _load(checkpoint, "nf4")(**inputs).logits, rtol=0, atol=0
        )

    class WithoutDeclaration(MiMoAudioForConditionalGeneration):
        _keep_in_fp32_modules = None

    default = _load(checkpoint, "nf4", WithoutDeclaration)
    heads = [type(head) for head in default.patch_decoder.heads]
    assert heads[:-1] == [bnb.nn.Linear4bit] * (len(heads) - 1) and heads[-1] is nn.Linear
    assert isinstance(default.patch_decoder.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(default.lm_head) is nn.Linear


@pytest.mark.parametrize("quantized", [False, True])
def test_fp16_keeps_the_unquantized_modules_in_fp32(checkpoint, reference, inputs, quantized):
    """`dtype=float16` (alone or with nf4, fp16 compute): the declared modules load in fp32, the LLM in fp16; forward
    and generate run. Text logits vs fp32: relative error below 0.01 unquantized (fp16 rounding, measured 1.1e-3) and
    below the nf4 bound quantized (measured 0.218)."""
    kwargs = {"dtype": torch.float16}
    if quantized:
        kwargs.update(
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16),
            device_map="cpu",
        )
    model = MiMoAudioForConditionalGeneration.from_pretrained(checkpoint, **kwargs).eval()
    assert model.model.language_model.norm.weight.dtype == torch.float16
    for prefix in UNQUANTIZED_MODULES:
        assert all(param.dtype == torch.float32 for param in model.get_submodule(prefix).parameters()), prefix
    with torch.no_grad():
        expected = reference(**inputs)
        output = model(**inputs)
    relative = ((output.logits.float() - expected.logits).norm() / expected.logits.norm()).item()
    assert relative < (TOLERANCE["nf4"]["relative"] if quantized else 0.01), relative
    generated = model.generate(inputs["input_ids"], audio_input_ids=inputs["audio_input_ids"], max_new_tokens=4)
    assert generated.audio_sequences.shape == (2, 24, model.config.group_size, model.config.audio_channels)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_torchao_int8_weight_only(checkpoint, reference, inputs, tmp_path):
    """torchao int8 weight-only: same split (the class declaration feeds `modules_to_not_convert`), logits within
    the int8 tolerance, generate runs, save + reload gives identical logits."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    model = MiMoAudioForConditionalGeneration.from_pretrained(
        checkpoint, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu"
    ).eval()
    llm_weight = model.model.language_model.layers[0].mlp.up_proj.weight
    assert type(llm_weight) is not torch.Tensor and type(llm_weight) is not nn.Parameter
    for name in ("patch_decoder.layers.0.mlp.up_proj", "patch_decoder.heads.0", "model.patch_encoder.proj", "lm_head"):
        assert type(model.get_submodule(name).weight) is nn.Parameter, name
    with torch.no_grad():
        expected = reference(**inputs)
        output = model(**inputs)
    relative = ((output.logits - expected.logits).norm() / expected.logits.norm()).item()
    assert 1e-4 < relative < TOLERANCE["int8"]["relative"], relative
    generated = model.generate(inputs["input_ids"], audio_input_ids=inputs["audio_input_ids"], max_new_tokens=4)
    assert generated.sequences.shape == (2, 24)
    model.save_pretrained(tmp_path)
    reloaded = MiMoAudioForConditionalGeneration.from_pretrained(tmp_path, device_map="cpu").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, output.logits)


def test_4bit_layers_the_packed_cpu_kernel_rejects_keep_working(tmp_path):
    """bitsandbytes' packed AVX512-BF16 CPU kernel needs out_features % 32 == 0 and in_features % blocksize == 0; a
    16-wide k/v projection and an 80-wide MLP are decided at load time to use its generic 4-bit path (reported), so
    inference (no grad, where bitsandbytes would repack) runs instead of failing inside bitsandbytes."""
    from transformers.testing_utils import CaptureLogger

    from transformers_mimo import MiMoAudioConfig, modeling_mimo_audio

    config = MiMoAudioConfig.from_pretrained(GOLDEN / "lm_b" / "checkpoint")
    config.text_config.num_key_value_heads = 1  # k_proj / v_proj: 16 outputs
    config.text_config.intermediate_size = 80  # gate / up: 80 outputs, down: 80 inputs
    torch.manual_seed(0)
    reference = MiMoAudioForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp_path)
    quantization_config = BitsAndBytesConfig(**MODES["nf4"])
    with CaptureLogger(modeling_mimo_audio.logger) as captured:
        model = MiMoAudioForConditionalGeneration.from_pretrained(
            tmp_path, quantization_config=quantization_config, device_map="cpu"
        ).eval()
    packable = {
        name: module.support_avx512bf16_for_cpu
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    assert len(packable) == 7 * config.text_config.num_hidden_layers
    if bnb.nn.Linear4bit(96, 32).support_avx512bf16_for_cpu:  # a CPU with the AVX512-BF16 kernel
        assert "use its generic 4-bit path" in captured.out
        assert "model.language_model.layers.0.self_attn.k_proj" in captured.out
        assert not any(packable.values())  # here no width fits the packed kernel (in_features 96 % 64 != 0)
    input_ids = torch.randint(0, 400, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        expected = reference(input_ids=input_ids).logits
    assert logits.shape == (1, 6, 448) and torch.isfinite(logits).all()
    assert (logits - expected).norm() / expected.norm() < 0.5
    generated = model.generate(
        input_ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True
    )
    assert generated.sequences.shape == (1, 9)
