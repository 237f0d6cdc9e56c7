"""Convert an original MiMo-Audio-Tokenizer checkpoint directory into a Hugging Face directory.

The original directory (as published in `XiaomiMiMo/MiMo-Audio-Tokenizer`) holds `config.json` (possibly without
`model_type`) and `model.safetensors` (or shards listed in `model.safetensors.index.json`) with the original key
layout. The output directory holds:

- `config.json`: a [`MiMoAudioTokenizerConfig`] (`model_type: "mimo_audio_tokenizer"`),
- `model.safetensors`: the weights in the layout of [`MiMoAudioTokenizerModel`],
- `preprocessor_config.json`: the matching [`MiMoAudioFeatureExtractor`].

Every original tensor is either converted or listed as deliberately unused (the codebooks' EMA training state and
the ISTFT window, see `ORIGINAL_TOKENIZER_IGNORED_KEYS`); a missing, unexpected or mis-shaped tensor stops the
conversion before anything is written.

Usage:

```bash
python -m transformers_mimo.convert_mimo_audio_tokenizer_to_hf \
    --input_dir MiMo-Audio-Tokenizer --output_dir mimo-audio-tokenizer-hf [--dtype bfloat16] [--force] [--verify]
```
"""

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_mimo_audio_tokenizer import MiMoAudioTokenizerConfig
from .conversion_mapping_mimo_audio import (
    ORIGINAL_TOKENIZER_WINDOW_KEY,
    check_original_istft_window,
    is_ignored_original_tokenizer_key,
    rename_original_tokenizer_key,
)
from .conversion_utils import (
    DTYPES,
    check_output_dir,
    conversion_argument_parser,
    run_conversion,
    staged_output_dir,
    write_model_card,
)
from .feature_extraction_mimo_audio import MiMoAudioFeatureExtractor
from .modeling_mimo_audio_tokenizer import MiMoAudioTokenizerModel


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@dataclass
class ConversionSummary:
    """What a conversion did (printed by `main`)."""

    input_dir: Path
    output_dir: Path
    num_original_tensors: int
    num_converted_tensors: int
    renamed: dict[str, str]
    ignored_keys: list[str]
    num_parameters: int
    dtypes: dict[str, int]
    files: list[str]
    verification: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"Converted {self.input_dir} -> {self.output_dir}",
            f"  original tensors:  {self.num_original_tensors}",
            f"  converted tensors: {self.num_converted_tensors} ({self.num_parameters:,} values; "
            + ", ".join(f"{count} {dtype}" for dtype, count in sorted(self.dtypes.items()))
            + ")",
            f"  renamed:           {len(self.renamed)}",
        ]
        renamed_groups = Counter(
            f"{_layer_pattern(old)} -> {_layer_pattern(new)}" for old, new in self.renamed.items()
        )
        lines += [f"    {name}  (x{count})" for name, count in sorted(renamed_groups.items())]
        lines.append(f"  unused (not written): {len(self.ignored_keys)}")
        unused_groups = Counter(_layer_pattern(key) for key in self.ignored_keys)
        lines += [f"    {name}  (x{count})" for name, count in sorted(unused_groups.items())]
        lines.append("  files: " + ", ".join(self.files))
        if self.verification:
            lines.append("  verification: " + ", ".join(f"{key}={value}" for key, value in self.verification.items()))
        return "\n".join(lines)


def _layer_pattern(key: str) -> str:
    """`a.layers.3.b` -> `a.layers.N.b`, to summarise per-layer keys."""
    return re.sub(r"\.\d+\.", ".N.", key)


def _read_original_config(input_dir: Path) -> MiMoAudioTokenizerConfig:
    config_file = input_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: the input must be an original MiMo-Audio-Tokenizer dir.")
    config_dict = json.loads(config_file.read_text())
    model_type = config_dict.get("model_type", MiMoAudioTokenizerConfig.model_type)
    if model_type != MiMoAudioTokenizerConfig.model_type:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; expected {MiMoAudioTokenizerConfig.model_type!r} (or none)."
        )
    for key in ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version"):
        config_dict.pop(key, None)
    return MiMoAudioTokenizerConfig(**config_dict)


def _weight_files(input_dir: Path) -> list[Path]:
    single, index = input_dir / WEIGHTS_NAME, input_dir / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (input_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return [input_dir / name for name in shards]
    raise FileNotFoundError(f"No {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {input_dir}.")


def _read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key in state_dict:
                    raise ValueError(f"Tensor `{key}` is stored twice (again in {path.name}).")
                state_dict[key] = handle.get_tensor(key)
    return state_dict


def convert_original_state_dict(
    state_dict: dict[str, torch.Tensor], config: MiMoAudioTokenizerConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Translates an original MiMo-Audio-Tokenizer state dict into the layout of [`MiMoAudioTokenizerModel`].

    Returns `(converted_state_dict, ignored_keys)`; `ignored_keys` lists the original tensors that are deliberately
    not used (see `ORIGINAL_TOKENIZER_IGNORED_KEYS`). Raises `ValueError` when a tensor is missing, unexpected or of
    the wrong shape, or when the stored ISTFT window is not the periodic Hann window the model rebuilds. Keys already
    in our layout pass through unchanged.
    """
    ignored_keys, converted = [], {}
    for key, tensor in state_dict.items():
        if is_ignored_original_tokenizer_key(key):
            if key == ORIGINAL_TOKENIZER_WINDOW_KEY:
                check_original_istft_window(tensor, config.nfft)
            ignored_keys.append(key)
            continue
        new_key = rename_original_tokenizer_key(key)
        if new_key in converted:
            raise ValueError(f"Two checkpoint tensors map to `{new_key}`.")
        converted[new_key] = tensor

    with torch.device("meta"):
        expected = MiMoAudioTokenizerModel(config).state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(converted[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(converted)
        if converted[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            "The checkpoint does not match the MiMo-Audio tokenizer configuration: "
            f"missing tensors {missing}, unexpected tensors {unexpected}, shape mismatches {mismatched}."
        )
    return converted, sorted(ignored_keys)


def _renamed_keys(original: dict[str, torch.Tensor], ignored_keys: list[str]) -> dict[str, str]:
    """Original key -> new key, for the converted tensors whose name changes."""
    renamed = {key: rename_original_tokenizer_key(key) for key in sorted(set(original) - set(ignored_keys))}
    return {key: new_key for key, new_key in renamed.items() if new_key != key}


def _verify(input_dir: Path, output_dir: Path, dtype: torch.dtype | None, seconds: float = 2.0) -> dict[str, float]:
    """Runs the original directory (renamed on load) and the converted one on the same waveform; raises on mismatch.

    Both models run in the converted dtype, so their weights are identical and results must be equal.
    """
    original = MiMoAudioTokenizerModel.from_pretrained(input_dir).eval()
    converted = MiMoAudioTokenizerModel.from_pretrained(output_dir, dtype="auto").eval()
    original.to(dtype or next(converted.parameters()).dtype)
    feature_extractor = MiMoAudioFeatureExtractor.from_pretrained(output_dir)

    rate = feature_extractor.sampling_rate
    time = torch.arange(int(seconds * rate)) / rate
    generator = torch.Generator().manual_seed(0)
    waveform = 0.3 * torch.sin(2 * math.pi * 220.0 * time) * torch.sin(math.pi * time / seconds)
    waveform = waveform + 0.02 * torch.randn(time.shape, generator=generator)
    features = feature_extractor(waveform, sampling_rate=rate, return_tensors="pt")
    model_dtype = next(converted.parameters()).dtype
    input_features = features["input_features"].to(model_dtype)

    results = []
    for model in (original, converted):
        encoded = model.encode(input_features, features["input_features_mask"])
        decoded = model.decode(encoded.audio_codes, encoded.audio_codes_mask)
        results.append((encoded.audio_codes, decoded.audio_values))
    (codes_a, audio_a), (codes_b, audio_b) = results
    if not torch.equal(codes_a, codes_b):
        raise ValueError("Verification failed: the converted model gives other codes than the original directory.")
    max_abs = (audio_a.float() - audio_b.float()).abs().max().item()
    if max_abs != 0.0:
        raise ValueError(f"Verification failed: decoded waveforms differ by up to {max_abs:.3g}.")
    return {"codes_identical": True, "codes_shape": tuple(codes_a.shape), "waveform_max_abs_diff": max_abs}


def convert_mimo_audio_tokenizer_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    dtype: str | None = None,
    force: bool = False,
    verify: bool = False,
) -> ConversionSummary:
    """Converts an original MiMo-Audio-Tokenizer directory into a Hugging Face directory (see the module docstring).

    Args:
        input_dir: original checkpoint directory (`config.json` + `model.safetensors` or shards).
        output_dir: directory to write; must be empty or absent unless `force`, and must not be, lie inside or link to
            `input_dir`. The files are written next to it and moved in once complete (and verified).
        dtype: `"float32"`, `"bfloat16"` or `"float16"` to cast floating-point tensors; `None` keeps each tensor's
            stored dtype.
        force: write into a non-empty `output_dir`, replacing only the files this conversion writes.
        verify: afterwards, run the original directory and the converted one on a synthetic clip and require
            identical codes and waveforms.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"Input directory {input_dir} does not exist.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}.")
    check_output_dir(output_dir, {"--input_dir": input_dir}, force)

    config = _read_original_config(input_dir)
    original = _read_state_dict(_weight_files(input_dir))
    try:
        converted, ignored_keys = convert_original_state_dict(original, config)
    except ValueError as error:
        raise ValueError(f"Cannot convert {input_dir}: {error}") from error
    accounted = len(converted) + len(ignored_keys)
    if accounted != len(original):
        raise ValueError(f"{len(original)} original tensors but {accounted} converted or ignored.")

    target_dtype = DTYPES.get(dtype)
    if target_dtype is not None:
        converted = {k: v.to(target_dtype) if v.is_floating_point() else v for k, v in converted.items()}
    converted = {key: tensor.contiguous() for key, tensor in converted.items()}
    float_dtypes = Counter(t.dtype for t in converted.values() if t.is_floating_point())
    config.dtype = target_dtype or float_dtypes.most_common(1)[0][0]
    config.architectures = [MiMoAudioTokenizerModel.__name__]

    feature_extractor = MiMoAudioFeatureExtractor.from_audio_tokenizer_config(config)

    summary = ConversionSummary(
        input_dir=input_dir,
        output_dir=output_dir,
        num_original_tensors=len(original),
        num_converted_tensors=len(converted),
        renamed=_renamed_keys(original, ignored_keys),
        ignored_keys=ignored_keys,
        num_parameters=sum(tensor.numel() for tensor in converted.values()),
        dtypes=dict(Counter(str(tensor.dtype).removeprefix("torch.") for tensor in converted.values())),
        files=["config.json", WEIGHTS_NAME, "preprocessor_config.json"],
    )
    # Written next to `output_dir` and moved into place only once complete (and verified, when asked).
    with staged_output_dir(output_dir) as staging:
        config.save_pretrained(staging)
        save_file(converted, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        feature_extractor.save_pretrained(staging)
        card_written = write_model_card(
            staging,
            output_dir,
            model_type="mimo_audio_tokenizer",
            title="MiMo-Audio-Tokenizer (transformers-mimo format)",
            source=input_dir.name,
            auto_classes="AutoFeatureExtractor, AutoModel",
            usage='feature_extractor = AutoFeatureExtractor.from_pretrained("path/to/this/dir")\n'
            'codec = AutoModel.from_pretrained("path/to/this/dir")  # MiMoAudioTokenizerModel: encode / decode',
        )
        if card_written:
            summary.files.append("README.md")
        if verify:
            summary.verification = _verify(input_dir, staging, target_dtype)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = conversion_argument_parser(__doc__.split("\n\n")[0], "MiMo-Audio-Tokenizer")
    args = parser.parse_args(argv)
    # The options are `convert_mimo_audio_tokenizer_checkpoint`'s arguments.
    summary = run_conversion(convert_mimo_audio_tokenizer_checkpoint, **vars(args))
    print(summary)


if __name__ == "__main__":
    main()
