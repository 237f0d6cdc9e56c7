"""PEFT LoRA on MiMoAudioForConditionalGeneration: target presets, gradient checkpointing, QLoRA (4-bit) and 8-bit
training, adapter save / reload / merge, generation through the PEFT wrapper."""

import re

import bitsandbytes as bnb
import pytest
import torch
from conftest import GOLDEN
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import BitsAndBytesConfig

from transformers_mimo import (
    LORA_TARGET_MODULES,
    QUANTIZATION_SKIP_MODULES,
    MiMoAudioForConditionalGeneration,
    get_lora_target_modules,
)


CHECKPOINT = GOLDEN / "lm_a" / "checkpoint"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(**kwargs):
    return MiMoAudioForConditionalGeneration.from_pretrained(CHECKPOINT, **kwargs)


def _quantized(mode):
    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if mode == "4bit"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    config.llm_int8_skip_modules = list(QUANTIZATION_SKIP_MODULES)
    return _model(quantization_config=config, device_map="cpu")


@pytest.fixture(scope="module")
def batch():
    """Two rows with text and an audio segment, labels on every position (teacher forcing of text and audio)."""
    config = _model().config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 400, (2, 16), generator=generator)
    input_ids[:, 6:10] = config.empty_token_id
    audio = torch.tensor(config.audio_empty_ids).expand(2, 16, config.group_size, config.audio_channels).clone()
    sizes = torch.tensor(config.audio_vocab_sizes)
    codes = (torch.rand(audio.shape, generator=generator) * (sizes - 1)).long()
    audio[:, 6:10] = codes[:, 6:10]
    return {"input_ids": input_ids, "audio_input_ids": audio, "labels": input_ids, "audio_labels": audio}


def _expected_targets(model, preset):
    """Module names a preset must wrap, listed independently of the preset's regular expression."""
    config = model.config
    projections = [f"self_attn.{proj}" for proj in PROJECTIONS[:4]] + [f"mlp.{proj}" for proj in PROJECTIONS[4:]]
    llm = [
        f"model.language_model.layers.{layer}.{proj}"
        for layer in range(config.text_config.num_hidden_layers)
        for proj in projections
    ]
    decoder = [
        f"patch_decoder.layers.{layer}.{proj}"
        for layer in range(config.patch_decoder_config.num_hidden_layers)
        for proj in projections
    ] + ["patch_decoder.input_proj"]
    if model.patch_decoder.embeddings_proj is not None:
        decoder.append("patch_decoder.embeddings_proj")
    return set(
        {"language_model": llm, "patch_decoder": decoder, "language_model_and_patch_decoder": llm + decoder}[preset]
    )


def _lora_modules(peft_model):
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("preset", list(LORA_TARGET_MODULES))
def test_presets_wrap_exactly_their_modules(preset):
    model = _model()
    assert model.patch_decoder.embeddings_proj is not None  # lm_a: embedding width 48 != patch decoder width 32
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=get_lora_target_modules(preset)))
    wrapped = _lora_modules(peft_model)
    assert wrapped == _expected_targets(model, preset)
    assert not any(re.search(r"patch_encoder|heads|lm_head|embed_tokens|audio_embeddings", name) for name in wrapped)
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="Unknown LoRA preset 'mlp'"):
        get_lora_target_modules("mlp")


def _lora_grads(peft_model):
    return {name: param.grad.clone() for name, param in peft_model.named_parameters() if param.requires_grad}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch):
    """LoRA on the LLM and the patch decoder, fp32: with gradient checkpointing (non-reentrant; the LLM and both
    patch transformers are checkpointed) the loss and every LoRA gradient equal the run without (1e-5, fp32; the
    patch decoder's attention dropout is replayed from the saved RNG state)."""
    results = []
    for checkpointing in (False, True):
        model = _model()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        lora = LoraConfig(
            r=4, target_modules=get_lora_target_modules("language_model_and_patch_decoder"), init_lora_weights=False
        )
        torch.manual_seed(0)  # same random LoRA weights in both runs
        peft_model = get_peft_model(model, lora)
        peft_model.train()
        torch.manual_seed(0)
        loss = peft_model(**batch).loss
        loss.backward()
        results.append((loss.detach(), _lora_grads(peft_model)))
        if checkpointing:
            layers = [
                *model.model.language_model.layers,
                *model.patch_decoder.layers,
                *model.model.patch_encoder.layers,
            ]
            assert all(layer.gradient_checkpointing for layer in layers)
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss_plain, rtol=1e-5, atol=1e-5)
    assert grads_plain.keys() == grads_checkpointed.keys()
    assert any("patch_decoder" in name for name in grads_plain) and any(
        "language_model" in name for name in grads_plain
    )
    for name, grad in grads_plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_kbit_lora_training_lowers_the_loss(batch, mode):
    """QLoRA (nf4) and 8-bit LoRA through `prepare_model_for_kbit_training` with gradient checkpointing: the base
    layers stay quantized, every LoRA tensor gets a gradient, and 5 AdamW steps on a fixed batch lower the loss."""
    model = _quantized(mode)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    peft_model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=get_lora_target_modules("language_model_and_patch_decoder")),
    )
    base = peft_model.base_model.model
    quantized_class = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(base.model.language_model.layers[0].self_attn.q_proj.base_layer, quantized_class)
    assert type(base.patch_decoder.layers[0].self_attn.q_proj.base_layer) is nn.Linear
    assert base.is_activation_checkpointing

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    torch.manual_seed(0)
    for step in range(5):
        loss = peft_model(**batch).loss
        loss.backward()
        if step == 0:
            grads = {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}
            assert all(grad is not None for grad in grads.values())
            assert any(grad.abs().sum() > 0 for name, grad in grads.items() if "language_model" in name)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_adapter_save_reload_and_merge(batch, tmp_path):
    """A non-trivial adapter (random LoRA weights) changes the outputs; saved and reloaded on a fresh base it gives
    identical logits; merged into the base (`merge_and_unload`) it gives a plain model whose text and audio logits
    equal the adapter's within 1e-5 (fp32 rounding of W + BA), and greedy generation is the same before and after."""
    lora = LoraConfig(
        r=4, target_modules=get_lora_target_modules("language_model_and_patch_decoder"), init_lora_weights=False
    )
    peft_model = get_peft_model(_model().eval(), lora).eval()
    inputs = {key: batch[key] for key in ("input_ids", "audio_input_ids", "labels", "audio_labels")}
    with torch.no_grad():
        adapted = peft_model(**inputs)
        base = _model().eval()(**inputs)
    assert (adapted.logits - base.logits).abs().max() > 1e-2

    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_model().eval(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, adapted.logits)

    generation = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    prompt = {"input_ids": batch["input_ids"][:, :10], "audio_input_ids": batch["audio_input_ids"][:, :10]}
    before = reloaded.generate(**prompt, **generation)
    merged = reloaded.merge_and_unload()
    assert type(merged) is MiMoAudioForConditionalGeneration
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    with torch.no_grad():
        output = merged(**inputs)
    # Merging folds B @ A into W, a different fp32 summation order: allow 1e-5 + 1e-5 * |logit|.
    torch.testing.assert_close(output.logits, adapted.logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(output.audio_logits, adapted.audio_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = merged.generate(**prompt, **generation)
    assert torch.equal(after.sequences, before.sequences)
    assert torch.equal(after.audio_sequences, before.audio_sequences)


def test_adapter_reloads_on_a_4bit_base(batch, tmp_path):
    """An adapter trained on a 4-bit base reloads on a fresh 4-bit base with identical logits."""
    lora = LoraConfig(r=4, target_modules=get_lora_target_modules("language_model"), init_lora_weights=False)
    peft_model = get_peft_model(_quantized("4bit"), lora).eval()
    inputs = {"input_ids": batch["input_ids"], "audio_input_ids": batch["audio_input_ids"]}
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_quantized("4bit"), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
