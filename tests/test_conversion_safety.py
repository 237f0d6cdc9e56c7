"""The conversions never write into their inputs and never leave a partial output (issue 17, item 7).

Every test records the bytes of every pre-existing file (inputs and output directory) and checks them afterwards; a
failed conversion must leave no file in the output directory's parent but the ones that were there.
"""

import json
import math
import os
import shutil

import pytest
import torch
from conftest import GOLDEN
from safetensors.torch import load_file, save_file

from transformers_mimo.convert_mimo_audio_to_hf import convert
from transformers_mimo.convert_mimo_audio_to_hf import main as convert_lm
from transformers_mimo.convert_mimo_audio_tokenizer_to_hf import main as convert_codec


def snapshot(*directories):
    """Path -> bytes of every file below `directories` (symbolic links followed)."""
    files = {}
    for directory in directories:
        for root, _, names in os.walk(directory, followlinks=True):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    files[path] = handle.read()
    return files


@pytest.fixture
def originals(tmp_path):
    """Copies of an original LM and an original codec checkpoint."""
    lm, codec = tmp_path / "lm", tmp_path / "codec"
    shutil.copytree(GOLDEN / "lm_b" / "checkpoint", lm)
    shutil.copytree(GOLDEN / "tok_b" / "checkpoint", codec)
    return lm, codec


def run_failing(main, argv, capsys, exit_code):
    """Runs a conversion `main` that must fail: its exit code and one `error: ...` line (after any progress bars) on
    stderr, no traceback. Returns that line."""
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == exit_code
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines), lines
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == lines[-1] and lines[-1].startswith("error: "), lines
    return lines[-1]


@pytest.mark.parametrize("layout", ["output_is_tokenizer_dir", "output_links_to_tokenizer_dir", "output_in_input_dir",
                                    "output_links_to_input_dir", "tokenizer_dir_is_output_codec_dir"])  # fmt: skip
def test_output_dir_may_never_be_an_input(originals, tmp_path, capsys, layout):
    lm, codec = originals
    tokenizer_dir = codec
    if layout == "output_is_tokenizer_dir":
        output = codec
    elif layout == "output_links_to_tokenizer_dir":
        output = tmp_path / "link"
        output.symlink_to(codec, target_is_directory=True)
    elif layout == "output_in_input_dir":
        output = lm / "hf"
    elif layout == "output_links_to_input_dir":
        output = tmp_path / "link"
        output.symlink_to(lm, target_is_directory=True)
    else:
        output = tmp_path / "out"
        tokenizer_dir = output / "audio_tokenizer"
        shutil.copytree(codec, tokenizer_dir)
    before, entries = snapshot(tmp_path), sorted(path.name for path in tmp_path.iterdir())
    argv = ["--input_dir", str(lm), "--tokenizer_dir", str(tokenizer_dir), "--output_dir", str(output), "--force"]
    message = run_failing(convert_lm, argv, capsys, exit_code=2)
    assert "also with --force" in message or "also not with --force" in message
    assert snapshot(tmp_path) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == entries
    assert not (lm / "hf").exists()


def test_codec_output_dir_may_never_be_its_input(originals, tmp_path, capsys):
    _, codec = originals
    link = tmp_path / "link"
    link.symlink_to(codec, target_is_directory=True)
    before = snapshot(tmp_path)
    for output in (codec, link, codec / "inside"):
        run_failing(convert_codec, ["--input_dir", str(codec), "--output_dir", str(output), "--force"], capsys, 2)
    assert snapshot(tmp_path) == before


def test_force_replaces_only_the_files_the_conversion_writes(originals, tmp_path):
    lm, codec = originals
    output = tmp_path / "out"
    (output / "audio_tokenizer").mkdir(parents=True)
    kept = {
        output / "model_backup.safetensors": b"my backup",
        output / "notes.txt": b"keep me",
        output / "audio_tokenizer" / "model_old.safetensors": b"old codec weights",
    }
    for path, content in kept.items():
        path.write_bytes(content)
    (output / "model.safetensors").write_bytes(b"an earlier conversion")
    (output / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard of an earlier conversion")
    inputs = snapshot(lm, codec)
    convert_lm(["--input_dir", str(lm), "--tokenizer_dir", str(codec), "--output_dir", str(output), "--force"])
    assert snapshot(lm, codec) == inputs
    assert {path: path.read_bytes() for path in kept} == kept
    assert sorted(path.name for path in output.glob("model*.safetensors")) == [
        "model.safetensors", "model_backup.safetensors"
    ]  # fmt: skip
    assert len(load_file(output / "model.safetensors")) > 0
    assert json.loads((output / "audio_tokenizer" / "config.json").read_text())["model_type"] == "mimo_audio_tokenizer"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temporary directory left


def corrupt(lm, how):
    weights_path = lm / "model.safetensors"
    if how == "truncated":
        data = weights_path.read_bytes()
        weights_path.write_bytes(data[: len(data) // 2])
    elif how == "garbage_header":
        weights_path.write_bytes(b"\xff" * 64 + weights_path.read_bytes()[64:])
    elif how == "nan_weights":
        weights = load_file(weights_path)
        weights["speech_embeddings.0.weight"][:] = math.nan
        save_file(weights, weights_path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "failure, extra_args",
    [("bad_shard_size", ["--max_shard_size", "banana"]), ("truncated", []), ("garbage_header", []),
     ("nan_weights", ["--verify"])],
)  # fmt: skip
@pytest.mark.parametrize("existing_output", [False, True])
def test_failed_conversion_leaves_no_partial_output(originals, tmp_path, capsys, failure, extra_args, existing_output):
    lm, codec = originals
    corrupt(lm, failure)
    output = tmp_path / "out"
    if existing_output:
        output.mkdir()
        (output / "model.safetensors").write_bytes(b"an earlier conversion")
        (output / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    argv = ["--input_dir", str(lm), "--tokenizer_dir", str(codec), "--output_dir", str(output), "--force", *extra_args]
    message = run_failing(convert_lm, argv, capsys, exit_code=1)
    assert snapshot(tmp_path) == before
    assert output.exists() == existing_output
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
    if failure == "nan_weights":
        assert "not finite" in message


def test_failed_codec_verification_leaves_no_output(originals, tmp_path, capsys):
    _, codec = originals
    weights = load_file(codec / "model.safetensors")
    name = next(key for key in weights if key.startswith("decoder.") and key.endswith(".weight"))
    weights[name][:] = math.nan
    save_file(weights, codec / "model.safetensors", metadata={"format": "pt"})
    output = tmp_path / "out"
    before = snapshot(tmp_path)
    run_failing(convert_codec, ["--input_dir", str(codec), "--output_dir", str(output), "--verify"], capsys, 1)
    assert snapshot(tmp_path) == before and not output.exists()


def test_missing_input_dir_is_a_usage_error(tmp_path, capsys):
    message = run_failing(
        convert_lm, ["--input_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")], capsys, 2
    )
    assert "--input_dir" in message and "nowhere" in message
    assert list(tmp_path.iterdir()) == []


def test_conversion_writes_next_to_the_target(originals, tmp_path, monkeypatch):
    """The temporary directory lies next to the output directory (same file system, so the final move is a rename)."""
    lm, _ = originals
    seen = []
    original_save = torch.nn.Module.state_dict

    def record(self, *args, **kwargs):
        seen.append(sorted(path.name for path in tmp_path.iterdir()))
        return original_save(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "state_dict", record)
    convert(lm, tmp_path / "out")
    assert any(any(name.startswith(".out.") and name.endswith(".partial") for name in names) for names in seen)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["codec", "lm", "out"]


def test_model_card_says_what_to_import_and_never_replaces_a_readme(originals, tmp_path):
    lm, codec = originals
    output = tmp_path / "out"
    convert(lm, output, tokenizer_dir=codec)
    card = (output / "README.md").read_text()
    assert "import transformers_mimo" in card and "AutoProcessor.from_pretrained" in card
    assert "import transformers_mimo" in (output / "audio_tokenizer" / "README.md").read_text()
    (output / "README.md").write_text("my notes")
    convert(lm, output, tokenizer_dir=codec, force=True)
    assert (output / "README.md").read_text() == "my notes"
