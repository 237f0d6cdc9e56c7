"""Conversion of original MiMo-Audio LM checkpoints: every tensor accounted for, files written, and the full-size
model's parameter names and shapes checked on the meta device against the original key layout."""

import json
import shutil

import pytest
import torch
from conftest import GOLDEN
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor, AutoTokenizer, GenerationConfig, Qwen2Tokenizer
from transformers.testing_utils import CaptureLogger

from transformers_mimo import MiMoAudioConfig, MiMoAudioForConditionalGeneration
from transformers_mimo import convert_mimo_audio_to_hf as conversion
from transformers_mimo.conversion_mapping_mimo_audio import convert_original_config_dict
from transformers_mimo.convert_mimo_audio_to_hf import convert, convert_state_dict_keys, main, verify_conversion


# The released model's config.json fields (research notes §1.2), in the original flat format.
REAL_ORIGINAL_CONFIG = {
    "architectures": ["MiMoAudioModel"],
    "model_type": "qwen2",
    "vocab_size": 151680,
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 11008,
    "max_position_embeddings": 8192,
    "rope_theta": 640000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "speech_vocab_size": "1025-1025-129-129-129-129-129-129",
    "speech_zeroemb_idx": "1024-1024-128-128-128-128-128-128",
    "delay_pattern": "0-1-2-3-4-5-6-7",
    "group_size": 4,
    "audio_channels": 8,
    "local_dim": 1024,
    "local_layers": 16,
    "local_attn_heads": 64,
    "local_ffn_dim": 4096,
    "local_attn_dropout": 0.1,
    "input_local_layers": 6,
    "input_local_dim": 1024,
    "input_full_attention": True,
}


def qwen2_layer_shapes(prefix, hidden, heads, kv_heads, head_dim, ffn):
    return {
        f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
        f"{prefix}.self_attn.q_proj.bias": (heads * head_dim,),
        f"{prefix}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        f"{prefix}.self_attn.k_proj.bias": (kv_heads * head_dim,),
        f"{prefix}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        f"{prefix}.self_attn.v_proj.bias": (kv_heads * head_dim,),
        f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
        f"{prefix}.mlp.gate_proj.weight": (ffn, hidden),
        f"{prefix}.mlp.up_proj.weight": (ffn, hidden),
        f"{prefix}.mlp.down_proj.weight": (hidden, ffn),
        f"{prefix}.input_layernorm.weight": (hidden,),
        f"{prefix}.post_attention_layernorm.weight": (hidden,),
    }


def original_key_shapes(config: dict) -> dict:
    """The original `MiMoAudioForCausalLM`'s state dict layout (keys and shapes) for a flat original config:
    Qwen2 `model.*`, untied `lm_head`, `speech_embeddings.i`, `input_local_transformer.*` and `local_transformer.*`
    without embedding tables, the two downcasts, per-channel heads, optional `speech_embeddings_to_local`."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or 128
    sizes = [int(size) for size in config["speech_vocab_size"].split("-")]
    local_dim, local_heads = config["local_dim"], config["local_attn_heads"]
    input_dim = config.get("input_local_dim") or local_dim
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for layer in range(config["num_hidden_layers"]):
        shapes.update(
            qwen2_layer_shapes(
                f"model.layers.{layer}",
                hidden,
                config["num_attention_heads"],
                config["num_key_value_heads"],
                head_dim,
                config["intermediate_size"],
            )
        )
    for layer in range(config["input_local_layers"]):
        shapes.update(
            qwen2_layer_shapes(
                f"input_local_transformer.layers.{layer}",
                input_dim,
                local_heads,
                local_heads,
                input_dim // local_heads,
                4 * input_dim,
            )
        )
    shapes["input_local_transformer.norm.weight"] = (input_dim,)
    for layer in range(config["local_layers"]):
        shapes.update(
            qwen2_layer_shapes(
                f"local_transformer.layers.{layer}",
                local_dim,
                local_heads,
                local_heads,
                local_dim // local_heads,
                config["local_ffn_dim"],
            )
        )
    shapes["local_transformer.norm.weight"] = (local_dim,)
    for channel, size in enumerate(sizes):
        shapes[f"speech_embeddings.{channel}.weight"] = (size, input_dim)
        shapes[f"local_transformer_lm_heads.{channel}.weight"] = (size, local_dim)
    shapes["speech_group_downcast.weight"] = (hidden, input_dim * config["group_size"])
    shapes["hidden_states_downcast.weight"] = (local_dim, hidden)
    if input_dim != local_dim:
        shapes["speech_embeddings_to_local.weight"] = (local_dim, input_dim)
    return shapes


def meta_model_shapes(original_config: dict) -> dict:
    # Shapes do not depend on the special token ids; `<|empty|>` only has to lie in the vocabulary.
    empty = {"empty_token_id": original_config["vocab_size"] - 1}
    config = MiMoAudioConfig(**convert_original_config_dict(original_config, empty))
    with torch.device("meta"):
        model = MiMoAudioForConditionalGeneration(config)
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters()}
    assert set(shapes) == set(model.state_dict())  # no persistent buffers besides parameters
    return shapes


@pytest.mark.parametrize("case", ["lm_a", "lm_b"])
def test_original_key_builder_matches_real_original_files(case):
    """The key-list builder used for the full-size check reproduces the original files' layout exactly."""
    checkpoint = GOLDEN / case / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    assert stored == original_key_shapes(config)


def test_full_size_model_matches_original_layout_on_meta_device():
    original = original_key_shapes(REAL_ORIGINAL_CONFIG)
    ours = meta_model_shapes(REAL_ORIGINAL_CONFIG)
    renames, dropped = convert_state_dict_keys(original, ours)  # raises on any missing/unexpected/mismatched key
    assert dropped == [] and len(renames) == len(original) == len(ours)
    assert {renames[key]: shape for key, shape in original.items()} == ours
    assert "patch_decoder.embeddings_proj.weight" not in ours
    assert ours["model.patch_encoder.proj.weight"] == (4096, 4096)
    assert ours["patch_decoder.input_proj.weight"] == (1024, 4096)
    assert ours["patch_decoder.heads.0.weight"] == (1025, 1024) and ours["patch_decoder.heads.7.weight"] == (129, 1024)
    assert ours["model.audio_embeddings.2.weight"] == (129, 1024)
    assert ours["model.language_model.layers.35.self_attn.k_proj.weight"] == (1024, 4096)
    total = sum(torch.Size(shape).numel() for shape in ours.values())
    # computed by hand: backbone 36 x 177,223,680 + 2 x 151680 x 4096 (embeddings, lm_head) + 4096 (norm);
    # patch encoder 6 x 16,782,336 + 1024 + 4096 x 4096 (proj); patch decoder 16 x 16,782,336 + 1024 + 1024 x 4096
    # (input_proj) + 2824 x 1024 (heads); audio embeddings 2824 x 1024
    backbone = 36 * 177_223_680 + 2 * 151680 * 4096 + 4096
    patch_encoder = 6 * 16_782_336 + 1024 + 4096 * 4096
    patch_decoder = 16 * 16_782_336 + 1024 + 1024 * 4096 + 2824 * 1024
    assert total == backbone + patch_encoder + patch_decoder + 2824 * 1024 == 8_018_587_648


def test_other_layouts_on_meta_device():
    """Embedding width different from the patch decoder width (with `speech_embeddings_to_local`), 4 channels."""
    config = dict(
        REAL_ORIGINAL_CONFIG,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        vocab_size=1000,
        local_dim=64,
        local_layers=3,
        local_attn_heads=4,
        local_ffn_dim=96,
        input_local_layers=2,
        input_local_dim=96,
        audio_channels=4,
        group_size=3,
        speech_vocab_size="33-9-9-5",
        speech_zeroemb_idx="32-8-8-4",
        delay_pattern="0-2-2-5",
    )
    original = original_key_shapes(config)
    assert original["speech_embeddings_to_local.weight"] == (64, 96)
    renames, _ = convert_state_dict_keys(original, meta_model_shapes(config))
    assert renames["speech_embeddings_to_local.weight"] == "patch_decoder.embeddings_proj.weight"


def test_key_check_names_every_problem():
    original = original_key_shapes(json.loads((GOLDEN / "lm_b" / "checkpoint" / "config.json").read_text()))
    ours = meta_model_shapes(json.loads((GOLDEN / "lm_b" / "checkpoint" / "config.json").read_text()))
    broken = dict(original)
    del broken["local_transformer_lm_heads.3.weight"]
    broken["speech_embeddings.9.weight"] = (9, 48)
    broken["hidden_states_downcast.weight"] = (48, 95)
    broken["model.layers.0.self_attn.rotary_emb.inv_freq"] = (8,)  # stray buffer: dropped, not an error
    with pytest.raises(ValueError) as error:
        convert_state_dict_keys(broken, ours)
    message = str(error.value)
    assert "patch_decoder.heads.3.weight" in message  # missing
    assert "speech_embeddings.9.weight" in message  # unexpected
    assert "hidden_states_downcast.weight (48, 95) -> patch_decoder.input_proj.weight (48, 96)" in message
    del broken["speech_embeddings.9.weight"]
    broken["local_transformer_lm_heads.3.weight"] = original["local_transformer_lm_heads.3.weight"]
    broken["hidden_states_downcast.weight"] = original["hidden_states_downcast.weight"]
    _, dropped = convert_state_dict_keys(broken, ours)
    assert dropped == ["model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_convert_checkpoint_with_codec(tmp_path):
    output = tmp_path / "hf"
    main(
        [
            "--input_dir", str(GOLDEN / "lm_a" / "checkpoint"),
            "--tokenizer_dir", str(GOLDEN / "tok_a" / "checkpoint"),
            "--output_dir", str(output),
            "--max_shard_size", "200KB",
            "--verify",
        ]
    )  # fmt: skip
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "mimo_audio" and config["architectures"] == ["MiMoAudioForConditionalGeneration"]
    assert config["empty_token_id"] == 405 and config["eot_token_id"] == 410
    generation = json.loads((output / "generation_config.json").read_text())
    expected_generation = {
        "do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.95,
        "audio_do_sample": True, "audio_temperature": 0.9, "audio_top_p": 0.95, "audio_top_k": None,
        "eos_token_id": [400, 402, 409], "pad_token_id": 400, "return_dict_in_generate": True, "max_length": None,
    }  # fmt: skip
    assert {key: generation.get(key) for key in expected_generation} == expected_generation
    assert GenerationConfig.from_pretrained(output).audio_temperature == 0.9

    converted = AutoModel.from_pretrained(output).eval()
    direct = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_a" / "checkpoint").eval()
    assert type(converted) is MiMoAudioForConditionalGeneration
    assert converted.generation_config.audio_top_p == 0.95
    for name, tensor in direct.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    grid = load_file(str(GOLDEN / "lm_a" / "golden.safetensors"))["asr.input_ids_grid"].long()
    input_ids, audio = grid[0, ::4][None], grid[1:].T.reshape(-1, 4, 8)[None]
    with torch.no_grad():
        logits = converted(input_ids=input_ids, audio_input_ids=audio).logits[:, -1:]
    expected = load_file(str(GOLDEN / "lm_a" / "golden.safetensors"))["fp32.asr.prefill.text_logits"]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.convert_tokens_to_ids(["<|empty|>", "<|sosp|>", "<|eot|>", "<|im_end|>"]) == [405, 403, 410, 402]

    codec_dir = output / "audio_tokenizer"
    assert (codec_dir / "preprocessor_config.json").is_file()
    codec = AutoModel.from_pretrained(codec_dir)
    assert type(codec).__name__ == "MiMoAudioTokenizerModel"
    with safe_open(str(GOLDEN / "tok_a" / "checkpoint" / "model.safetensors"), framework="pt") as handle:
        embed = handle.get_tensor("encoder.quantizer.vq.layers.0._codebook.embed")
    assert any(torch.equal(tensor, embed) for tensor in codec.state_dict().values())

    # Text tokenizer + codec given: the processor files are written too, and AutoProcessor assembles all three.
    assert (output / "processor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(output)
    assert type(processor).__name__ == "MiMoAudioProcessor" and processor.empty_token_id == 405
    assert type(processor.audio_tokenizer).__name__ == "MiMoAudioTokenizerModel"


def test_convert_refuses_to_overwrite_and_casts_dtype(tmp_path):
    output = tmp_path / "hf"
    output.mkdir()
    (output / "keep.txt").write_text("x")
    (output / "model-00002-of-00002.safetensors").write_text("stale shard of an earlier conversion")
    with pytest.raises(FileExistsError, match="--force"):
        convert(GOLDEN / "lm_b" / "checkpoint", output)
    convert(GOLDEN / "lm_b" / "checkpoint", output, dtype="bfloat16", force=True, verify=True)
    # --force replaces what a conversion writes (stale shards included) and leaves other files alone.
    assert (output / "keep.txt").read_text() == "x"
    assert sorted(path.name for path in output.glob("model*.safetensors")) == ["model.safetensors"]
    with safe_open(str(output / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="not an original MiMo-Audio config"):
        convert(output, tmp_path / "again")
    with pytest.raises(ValueError, match="is or lies inside --input_dir"):
        convert(output, output, force=True)
    assert (output / "model.safetensors").is_file()


def test_force_never_deletes_an_original_inside_the_output_dir(tmp_path):
    """An original checkpoint kept inside the output directory survives `--force`, also when the conversion fails."""
    output = tmp_path / "out"
    original = output / "original"
    shutil.copytree(GOLDEN / "lm_b" / "checkpoint", original)
    files = sorted(path.name for path in original.iterdir())
    convert(original, output, force=True)
    assert sorted(path.name for path in original.iterdir()) == files
    broken = output / "broken"
    shutil.copytree(original, broken, ignore=shutil.ignore_patterns("*.safetensors"))  # everything but the weights
    with pytest.raises(FileNotFoundError, match="No safetensors weights"):
        convert(broken, output, force=True)
    assert (output / "model.safetensors").is_file() and sorted(path.name for path in original.iterdir()) == files
    # A codec directory that does not exist stops the conversion before the language model's files are replaced.
    written = {path.name: path.stat().st_mtime_ns for path in output.iterdir() if path.is_file()}
    with pytest.raises(FileNotFoundError):
        convert(original, output, tokenizer_dir=tmp_path / "no-codec", force=True)
    assert {path.name: path.stat().st_mtime_ns for path in output.iterdir() if path.is_file()} == written


def test_rotary_buffers_are_dropped_only_when_recomputable(tmp_path):
    """Original checkpoints may carry the non-persistent rotary `inv_freq`: dropped with a message when it equals the
    one recomputed from the config, refused otherwise."""
    source = GOLDEN / "lm_b" / "checkpoint"
    config = MiMoAudioConfig.from_pretrained(source)
    head_dim = config.patch_decoder_config.head_dim
    theta = config.patch_decoder_config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    for name, buffer, ok in (("good", inv_freq.bfloat16(), True), ("bad", torch.ones_like(inv_freq), False)):
        directory = tmp_path / name
        shutil.copytree(source, directory)
        weights = load_file(str(source / "model.safetensors"))
        weights["local_transformer.rotary_emb.inv_freq"] = buffer
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        if ok:
            with CaptureLogger(conversion.logger) as captured:
                convert(directory, tmp_path / f"{name}-hf")
            assert "Dropped 1 rotary inv_freq buffer(s)" in captured.out
            assert "local_transformer.rotary_emb.inv_freq" in captured.out
            assert verify_conversion(source, tmp_path / f"{name}-hf") == 0.0
        else:
            with pytest.raises(
                ValueError, match="local_transformer.rotary_emb.inv_freq .* is not the rotary inv_freq"
            ):
                convert(directory, tmp_path / f"{name}-hf")


def test_verification_detects_a_changed_weight(tmp_path):
    source = GOLDEN / "lm_b" / "checkpoint"
    output = convert(source, tmp_path / "hf")
    assert verify_conversion(source, output) == 0.0
    weights = load_file(str(output / "model.safetensors"))
    weights["patch_decoder.heads.5.weight"][3] += 1.0
    save_file(weights, str(output / "model.safetensors"), metadata={"format": "pt"})
    assert verify_conversion(source, output) > 0.01


def test_convert_rejects_mismatched_weights(tmp_path):
    source = GOLDEN / "lm_b" / "checkpoint"
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = load_file(str(source / "model.safetensors"))
    del weights["speech_embeddings.5.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing parameters \['model\.audio_embeddings\.5\.weight'\]"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_adds_missing_special_tokens(tmp_path):
    """A text tokenizer without MiMo-Audio's tokens gets them appended, and the config takes their new ids."""
    source = GOLDEN / "lm_b" / "checkpoint"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, bare / name)
    vocab = json.loads((source / "vocab.json").read_text())
    merges = [
        tuple(line.split(" "))
        for line in (source / "merges.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    Qwen2Tokenizer(vocab=vocab, merges=merges).save_pretrained(bare)
    bare_tokenizer = AutoTokenizer.from_pretrained(bare)
    assert "<|empty|>" not in bare_tokenizer.get_vocab()
    base = len(bare_tokenizer)
    convert(bare, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    config = MiMoAudioConfig.from_pretrained(tmp_path / "out")
    new_ids = tokenizer.convert_tokens_to_ids(
        ["<|sosp|>", "<|eosp|>", "<|empty|>", "<|sostm|>", "<|eostm|>", "<|eot|>"]
    )
    assert new_ids == [base, base + 1, base + 2, base + 5, base + 6, base + 7]  # the original's order
    assert [config.sosp_token_id, config.eosp_token_id, config.empty_token_id] == new_ids[:3]
    assert [config.sostm_token_id, config.eostm_token_id, config.eot_token_id] == new_ids[3:]
    assert all(tokenizer.added_tokens_decoder[index].special for index in new_ids)
