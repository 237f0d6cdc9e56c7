"""Conversion of ORIGINAL MiMo-Audio-Tokenizer checkpoints (the golden tok_a / tok_b directories) to HF directories.

Codes are compared exactly (integers); weights are compared bitwise (the conversion only renames and casts).
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

from transformers_mimo import MiMoAudioFeatureExtractor, MiMoAudioTokenizerConfig, MiMoAudioTokenizerModel
from transformers_mimo.convert_mimo_audio_tokenizer_to_hf import convert_mimo_audio_tokenizer_checkpoint, main


REPO = Path(__file__).resolve().parents[1]
RENAMES = {
    r"^encoder\.quantizer\.vq\.layers\.(\d+)\._codebook\.embed$": r"quantizer.layers.\1.embed",
    r"^encoder\.down_sample_layer\.0\.weight$": "encoder.down_sample_layer.weight",
}
UNUSED = (
    r"^(encoder\.quantizer\.vq\.layers\.\d+\._codebook\.(cluster_size|embed_avg|inited)"
    r"|decoder\.vocoder\.head\.istft\.window)$"
)


def _expected_name(key):
    for pattern, replacement in RENAMES.items():
        key = re.sub(pattern, replacement, key)
    return key


def _copy_checkpoint(case, tmp_path):
    target = tmp_path / f"{case}_original"
    shutil.copytree(GOLDEN / case / "checkpoint", target)
    return target


@pytest.fixture(scope="module", params=["tok_a", "tok_b"])
def converted(request, tmp_path_factory):
    case = request.param
    output_dir = tmp_path_factory.mktemp(case) / "hf"
    main(["--input_dir", str(GOLDEN / case / "checkpoint"), "--output_dir", str(output_dir)])
    return case, output_dir


def test_converted_directory_layout_and_config(converted):
    case, output_dir = converted
    assert sorted(path.name for path in output_dir.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    original_config = json.loads((GOLDEN / case / "checkpoint" / "config.json").read_text())
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "mimo_audio_tokenizer"
    assert config["architectures"] == ["MiMoAudioTokenizerModel"]
    assert config["dtype"] == "float32"
    for key in ("d_model", "n_mels", "codebook_size", "num_quantizers", "vocoder_attn_window_size", "encoder_layers"):
        assert config[key] == original_config[key]
    assert isinstance(AutoConfig.from_pretrained(output_dir), MiMoAudioTokenizerConfig)


def test_every_original_tensor_is_converted_or_listed_unused(converted):
    case, output_dir = converted
    original = load_file(GOLDEN / case / "checkpoint" / "model.safetensors")
    written = load_file(output_dir / "model.safetensors")
    unused = sorted(key for key in original if re.match(UNUSED, key))
    used = sorted(set(original) - set(unused))
    assert len(unused) == 3 * len([key for key in original if key.endswith("._codebook.embed")]) + 1
    assert sorted(written) == sorted(_expected_name(key) for key in used)
    for key in used:
        assert torch.equal(written[_expected_name(key)], original[key]), key
    with safe_open(str(output_dir / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_converted_model_codes_equal_golden(converted):
    case, output_dir = converted
    golden = load_file(GOLDEN / case / "golden.safetensors")
    model = AutoModel.from_pretrained(output_dir).eval()
    assert type(model) is MiMoAudioTokenizerModel
    feature_extractor = AutoFeatureExtractor.from_pretrained(output_dir)
    assert type(feature_extractor) is MiMoAudioFeatureExtractor
    assert feature_extractor.n_mels == golden["mel"].shape[0]
    assert (feature_extractor.n_fft, feature_extractor.hop_length, feature_extractor.win_length) == (960, 240, 960)

    # From the golden mel, and end to end from the golden waveform through the converted feature extractor.
    from_mel = model.encode(golden["mel"][None]).audio_codes
    features = feature_extractor(golden["wav"], sampling_rate=24000, return_tensors="pt")
    from_wav = model.encode(features["input_features"], features["input_features_mask"]).audio_codes
    expected = golden["fp32.codes_single_segment"]
    assert from_mel.shape == from_wav.shape == (1, *expected.shape)
    assert torch.equal(from_mel[0], expected)
    assert torch.equal(from_wav[0], expected)


def test_removed_tensor_stops_conversion(tmp_path, capsys):
    source = _copy_checkpoint("tok_a", tmp_path)
    weights = load_file(source / "model.safetensors")
    del weights["encoder.layers.1.self_attn.q_proj.weight"]
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as error:
        main(["--input_dir", str(source), "--output_dir", str(output_dir)])
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert "missing tensors ['encoder.layers.1.self_attn.q_proj.weight']" in message
    assert not output_dir.exists()


def test_extra_tensor_stops_conversion(tmp_path):
    source = _copy_checkpoint("tok_b", tmp_path)
    weights = load_file(source / "model.safetensors")
    weights["decoder.extra_head.weight"] = torch.zeros(3, 3)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unexpected tensors \['decoder.extra_head.weight'\]"):
        convert_mimo_audio_tokenizer_checkpoint(source, output_dir)
    assert not output_dir.exists()


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    source = GOLDEN / "tok_b" / "checkpoint"
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="2"):
        main(["--input_dir", str(source), "--output_dir", str(output_dir)])
    assert "not empty; pass --force" in capsys.readouterr().err
    assert sorted(path.name for path in output_dir.iterdir()) == ["notes.txt"]

    (output_dir / "model-00001-of-00002.safetensors").write_text("stale shard")
    main(["--input_dir", str(source), "--output_dir", str(output_dir), "--force"])
    assert sorted(path.name for path in output_dir.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "notes.txt",
        "preprocessor_config.json",
    ]
    printed = capsys.readouterr().out
    assert "original tensors:  170" in printed and "unused (not written): 31" in printed
    with pytest.raises(SystemExit, match="2"):
        main(["--input_dir", str(source), "--output_dir", str(source), "--force"])
    assert "is or lies inside --input_dir" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_option(tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    output_dir = tmp_path / name
    main(["--input_dir", str(GOLDEN / "tok_b" / "checkpoint"), "--output_dir", str(output_dir), "--dtype", name])
    original = load_file(GOLDEN / "tok_b" / "checkpoint" / "model.safetensors")
    written = load_file(output_dir / "model.safetensors")
    assert {tensor.dtype for tensor in written.values()} == {dtype}
    for key, tensor in original.items():
        if not re.match(UNUSED, key):
            assert torch.equal(written[_expected_name(key)], tensor.to(dtype)), key
    assert json.loads((output_dir / "config.json").read_text())["dtype"] == name
    model = MiMoAudioTokenizerModel.from_pretrained(output_dir, dtype="auto")
    assert model.quantizer.layers[0].embed.dtype == dtype


def test_config_without_model_type_and_wrong_model_type(tmp_path):
    source = _copy_checkpoint("tok_a", tmp_path)
    config = json.loads((source / "config.json").read_text())
    config.pop("model_type")
    (source / "config.json").write_text(json.dumps(config))
    summary = convert_mimo_audio_tokenizer_checkpoint(source, tmp_path / "out")
    assert summary.num_original_tensors == 223 and summary.num_converted_tensors == 186
    assert len(summary.ignored_keys) == 37 and len(summary.renamed) == 13
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mimo_audio_tokenizer"

    config["model_type"] = "qwen2"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        convert_mimo_audio_tokenizer_checkpoint(source, tmp_path / "out2")


def test_missing_input_files(tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["--input_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])
    assert "does not exist" in capsys.readouterr().err
    source = _copy_checkpoint("tok_b", tmp_path)
    (source / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No model.safetensors"):
        convert_mimo_audio_tokenizer_checkpoint(source, tmp_path / "out")
    (source / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert_mimo_audio_tokenizer_checkpoint(source, tmp_path / "out")


def test_sharded_original_checkpoint(tmp_path):
    source = _copy_checkpoint("tok_b", tmp_path)
    weights = load_file(source / "model.safetensors")
    (source / "model.safetensors").unlink()
    keys = sorted(weights)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, shard_keys in shards.items():
        save_file({key: weights[key] for key in shard_keys}, source / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {key: name for name, shard_keys in shards.items() for key in shard_keys}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_mimo_audio_tokenizer_checkpoint(source, tmp_path / "out")
    reference = tmp_path / "reference"
    convert_mimo_audio_tokenizer_checkpoint(GOLDEN / "tok_b" / "checkpoint", reference)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_script_with_verify(tmp_path):
    output_dir = tmp_path / "hf"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "conversion" / "convert_mimo_audio_tokenizer_to_hf.py"),
            "--input_dir",
            str(GOLDEN / "tok_a" / "checkpoint"),
            "--output_dir",
            str(output_dir),
            "--verify",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "verification: codes_identical=True, codes_shape=(1, 12, 51), waveform_max_abs_diff=0.0" in result.stdout
    assert "encoder.quantizer.vq.layers.N._codebook.embed -> quantizer.layers.N.embed  (x12)" in result.stdout
