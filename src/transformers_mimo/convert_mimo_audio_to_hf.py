"""Converts an original MiMo-Audio language model checkpoint (and optionally its audio tokenizer) to this package's
Hugging Face layout.

    python -m transformers_mimo.convert_mimo_audio_to_hf --input_dir MiMo-Audio-7B-Instruct (or MiMo-V2.5-ASR) \
        [--tokenizer_dir MiMo-Audio-Tokenizer] --output_dir mimo-audio-hf [--dtype bfloat16] [--force] [--verify]

Loads the original (`load_original_checkpoint`), saves it, and with `--verify` runs both on a sample
(`verify_conversion`). Writes `config.json` (`model_type: "mimo_audio"`), sharded safetensors with renamed keys,
`generation_config.json` (the original's default sampling; greedy ASR for a MiMo-V2.5-ASR checkpoint), the text
tokenizer with MiMo-Audio's special tokens, and, with `--tokenizer_dir`, the converted audio tokenizer in
`audio_tokenizer/` (`convert_mimo_audio_tokenizer_to_hf`) and the processor files.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.utils import logging

from .configuration_mimo_audio import MiMoAudioConfig
from .conversion_mapping_mimo_audio import (
    ORIGINAL_DROPPED_KEY_PATTERN,
    SPECIAL_TOKENS,
    convert_original_config_dict,
    is_original_config_dict,
    rename_original_key,
    special_token_ids_from_vocab,
)
from .conversion_utils import (
    DTYPES,
    check_output_dir,
    conversion_argument_parser,
    run_conversion,
    staged_output_dir,
    write_model_card,
)
from .convert_mimo_audio_tokenizer_to_hf import convert_mimo_audio_tokenizer_checkpoint
from .generation_mimo_audio import default_generation_config
from .modeling_mimo_audio import MiMoAudioForConditionalGeneration
from .processing_mimo_audio import MiMoAudioProcessor


logger = logging.get_logger(__name__)


def convert_state_dict_keys(
    original_shapes: dict[str, tuple[int, ...]], expected_shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, str], list[str]]:
    """
    Maps every original key to its new name and checks the result against the model's parameters.

    Args:
        original_shapes: original key -> tensor shape.
        expected_shapes: parameter name -> shape of the target model.

    Returns:
        `(renames, dropped)`: original key -> new key for every kept tensor, and the original keys deliberately
        dropped (non-persistent rotary buffers).

    Raises:
        ValueError: naming every unexpected key, missing parameter and shape mismatch.
    """
    renames, dropped = {}, []
    for key in original_shapes:
        if ORIGINAL_DROPPED_KEY_PATTERN.search(key):
            dropped.append(key)
        else:
            renames[key] = rename_original_key(key)
    targets = set(renames.values())
    unexpected = sorted(key for key, new in renames.items() if new not in expected_shapes)
    missing = sorted(set(expected_shapes) - targets)
    mismatched = sorted(
        f"{key} {tuple(original_shapes[key])} -> {new} {tuple(expected_shapes[new])}"
        for key, new in renames.items()
        if new in expected_shapes and tuple(original_shapes[key]) != tuple(expected_shapes[new])
    )
    if len(targets) != len(renames):
        raise ValueError("Several original tensors map to the same parameter.")
    if unexpected or missing or mismatched:
        raise ValueError(
            "The original checkpoint does not match the configuration: "
            f"unexpected keys {unexpected}, missing parameters {missing}, shape mismatches {mismatched}."
        )
    return renames, dropped


def check_dropped_rotary_buffer(key: str, tensor: torch.Tensor, config: MiMoAudioConfig) -> None:
    """
    A dropped original tensor must be the rotary `inv_freq` buffer that our model recomputes: equal (to bf16 precision)
    to the one built from the config of the transformer it belongs to. Anything else stops the conversion.
    """
    new_key = rename_original_key(key)
    sub_configs = {
        "model.language_model.": config.text_config,
        "model.patch_encoder.": config.patch_encoder_config,
        "patch_decoder.": config.patch_decoder_config,
    }
    sub_config = next((sub for prefix, sub in sub_configs.items() if new_key.startswith(prefix)), None)
    if sub_config is None:
        raise ValueError(f"Tensor {key} looks like a rotary buffer but belongs to no transformer of the model.")
    expected = Qwen2RotaryEmbedding(config=sub_config).inv_freq
    if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, rtol=1e-2, atol=0.0):
        raise ValueError(
            f"Tensor {key} {tuple(tensor.shape)} is not the rotary inv_freq recomputed from the config "
            f"{tuple(expected.shape)}; refusing to drop it."
        )


def _safetensors_files(input_dir: Path) -> list[Path]:
    index = input_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [input_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(input_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {input_dir}.")
    return files


def load_text_tokenizer(input_dir: Path):
    """Loads the original text tokenizer and adds MiMo-Audio's missing special tokens, as the original does."""
    tokenizer = AutoTokenizer.from_pretrained(str(input_dir))
    vocab = tokenizer.get_vocab()
    missing = [token for token in SPECIAL_TOKENS.values() if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer


def load_original_checkpoint(input_dir: Path, dtype: str | None = None):
    """
    Loads an original MiMo-Audio checkpoint directory with its text tokenizer, translated with the tables of
    `conversion_mapping_mimo_audio` (the ones `from_pretrained` uses on an original directory). Unlike
    `from_pretrained`, every tensor keeps its stored dtype unless `dtype` is given, the text tokenizer gets the special
    tokens it lacks (as the original adds them; the config takes their ids), a stored rotary buffer is dropped only
    after checking its values, and every missing, unexpected or mis-shaped tensor is named before any is read.

    Args:
        input_dir (`Path`): the original directory (`config.json`, safetensors weights, text tokenizer files).
        dtype (`str`, *optional*): `"float32"`, `"bfloat16"` or `"float16"` to cast the weights to.

    Returns:
        `(model, tokenizer)`: a [`MiMoAudioForConditionalGeneration`] with the original's default generation config,
        and the text tokenizer (`None` when the directory has none).
    """
    config_path = input_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --input_dir must be an original MiMo-Audio checkpoint.")
    original_config = json.loads(config_path.read_text())
    if not is_original_config_dict(original_config):
        raise ValueError(f"{config_path} is not an original MiMo-Audio config (no `speech_vocab_size`).")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    has_text_tokenizer = (input_dir / "tokenizer.json").is_file() or (input_dir / "vocab.json").is_file()
    tokenizer = load_text_tokenizer(input_dir) if has_text_tokenizer else None
    special_ids = special_token_ids_from_vocab(tokenizer.get_vocab()) if tokenizer is not None else {}
    config = MiMoAudioConfig(**convert_original_config_dict(original_config, special_ids))
    target_dtype = DTYPES[dtype] if dtype is not None else None

    with torch.device("meta"):
        model = MiMoAudioForConditionalGeneration(config)
    expected_shapes = {name: tuple(param.shape) for name, param in model.state_dict().items()}

    files = _safetensors_files(input_dir)
    original_shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in original_shapes:
                    raise ValueError(f"Tensor {key} appears in several weight files.")
                original_shapes[key] = tuple(handle.get_slice(key).get_shape())
    renames, dropped = convert_state_dict_keys(original_shapes, expected_shapes)

    state_dict = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in renames:
                    tensor = handle.get_tensor(key)
                    state_dict[renames[key]] = tensor.to(target_dtype) if target_dtype is not None else tensor
                else:
                    check_dropped_rotary_buffer(key, handle.get_tensor(key), config)
    if dropped:
        logger.warning(
            f"Dropped {len(dropped)} rotary inv_freq buffer(s), recomputed from the config (values checked): {dropped}"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    stored_dtypes = {tensor.dtype for tensor in state_dict.values()}
    model.config.dtype = target_dtype or (stored_dtypes.pop() if len(stored_dtypes) == 1 else None)
    model.generation_config = default_generation_config(config, tokenizer)
    return model, tokenizer


def verify_conversion(input_dir: str | Path, output_dir: str | Path, dtype: str | None = None) -> float:
    """
    Loads the original directory (translated on load) and the converted one, runs both on a short sample with text
    and two audio patches, and returns the largest absolute difference of the text and patch decoder logits.
    """
    torch_dtype = DTYPES[dtype] if dtype is not None else "auto"
    original = MiMoAudioForConditionalGeneration.from_pretrained(str(input_dir), dtype=torch_dtype).eval()
    converted = MiMoAudioForConditionalGeneration.from_pretrained(str(output_dir), dtype=torch_dtype).eval()
    config = converted.config
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.text_config.vocab_size, (1, 6), generator=generator)
    input_ids[0, 2:4] = config.empty_token_id
    audio = torch.stack(
        [torch.randint(0, size, (1, 6, config.group_size), generator=generator) for size in config.audio_vocab_sizes],
        dim=-1,
    )
    labels = input_ids.clone()
    differences = []
    with torch.no_grad():
        outputs = [
            model(input_ids=input_ids, audio_input_ids=audio, labels=labels, audio_labels=audio)
            for model in (original, converted)
        ]
    differences.append((outputs[0].logits - outputs[1].logits).abs().max().item())
    for channel in range(config.audio_channels):
        differences.append((outputs[0].audio_logits[channel] - outputs[1].audio_logits[channel]).abs().max().item())
    return max(differences)


def convert(
    input_dir: str | Path,
    output_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: str = "5GB",
    verify: bool = False,
) -> Path:
    """
    Converts the checkpoint in `input_dir` into `output_dir`; returns `output_dir`. See the module docstring. With
    `verify`, both checkpoints are run on a sample afterwards and must give identical logits (`verify_conversion`).

    `output_dir` may not be, lie inside or link to `input_dir` or `tokenizer_dir` (also with `force`). Everything is
    written into a temporary directory next to it and moved in only when the conversion (and the verification)
    succeeded, so a failure leaves no partial output. With `force`, a non-empty `output_dir` receives the new files;
    only the files this conversion writes (and the weight files of an earlier conversion) are replaced.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input_dir {str(input_dir)!r} is not a directory.")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"--tokenizer_dir {str(tokenizer_dir)!r} is not a directory.")
    check_output_dir(
        output_dir,
        {"--input_dir": input_dir, "--tokenizer_dir": tokenizer_dir},
        force,
        written_subdirs=("audio_tokenizer",),
    )
    model, tokenizer = load_original_checkpoint(input_dir, dtype)

    # Everything is written next to `output_dir` and moved into place only once complete (and verified, when asked).
    with staged_output_dir(output_dir) as staging:
        if tokenizer_dir is not None:
            convert_mimo_audio_tokenizer_checkpoint(
                tokenizer_dir, staging / "audio_tokenizer", dtype=dtype, verify=verify
            )
        model.save_pretrained(str(staging), max_shard_size=max_shard_size)
        write_model_card(
            staging,
            output_dir,
            model_type="mimo_audio",
            title="MiMo-Audio (transformers-mimo format)",
            source=input_dir.name,
            auto_classes="AutoModel, AutoProcessor",
            usage='processor = AutoProcessor.from_pretrained("path/to/this/dir")  # text tokenizer + codec\n'
            'model = AutoModel.from_pretrained("path/to/this/dir")  # MiMoAudioForConditionalGeneration',
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
            if tokenizer_dir is not None:
                # Text tokenizer + codec are both there: write the processor files (processor_config.json, ...).
                MiMoAudioProcessor.from_pretrained(staging).save_pretrained(staging)
        if verify:
            difference = verify_conversion(input_dir, staging, dtype)
            if not math.isfinite(difference):
                raise ValueError(
                    "Verification failed: the logits are not finite (NaN or infinite weights in the checkpoint?)."
                )
            if difference != 0:
                raise ValueError(
                    f"Verification failed: the converted checkpoint's logits differ by up to {difference}."
                )
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = conversion_argument_parser(__doc__, "MiMo-Audio (or MiMo-V2.5-ASR) language model")
    parser.add_argument("--tokenizer_dir", default=None, help="original MiMo-Audio-Tokenizer directory (optional)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = parser.parse_args(argv)
    output_dir = run_conversion(convert, **vars(args))  # the options are `convert`'s arguments
    print(f"Converted {args.input_dir} -> {output_dir}")


__all__ = ["convert", "convert_state_dict_keys", "load_original_checkpoint", "main", "verify_conversion"]

if __name__ == "__main__":
    main()
