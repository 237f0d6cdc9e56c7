"""MiMo-V2.5-ASR: loading and converting its original directories, its audio recipe, prompts and greedy generations
(golden-exact against the V2.5 code), transcript cleanup, and bad input. Everything is driven by the checkpoints'
configs and the manifests, so other V2.5-style checkpoints run the same checks."""

import json
import random
import shutil

import pytest
import soundfile as sf
import torch
from conftest import AUDIO, GOLDEN
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoProcessor, GenerationConfig

from transformers_mimo import (
    V25_ASR_INSTRUCTIONS,
    MiMoAudioConfig,
    MiMoAudioDataCollator,
    MiMoAudioForConditionalGeneration,
    MiMoAudioProcessor,
)
from transformers_mimo.conversion_mapping_mimo_audio import V25_ASR_ARCHITECTURE
from transformers_mimo.convert_mimo_audio_to_hf import convert


CASES = ("v25_lm_a", "v25_lm_b")
CODEC_OF = {"v25_lm_a": "tok_a", "v25_lm_b": "tok_b"}
SAME_TENSORS_AS = {"v25_lm_a": "lm_a", "v25_lm_b": "lm_b"}


def _golden(case):
    return (
        load_file(GOLDEN / case / "golden_v25.safetensors"),
        json.loads((GOLDEN / case / "manifest_v25.json").read_text()),
    )


def _checkpoint(case):
    return GOLDEN / case / "checkpoint"


def _codec_dir(case):
    return GOLDEN / CODEC_OF[case] / "checkpoint"


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return request.param


@pytest.fixture(scope="module")
def processor(case):
    return MiMoAudioProcessor.from_pretrained(_checkpoint(case), audio_tokenizer=_codec_dir(case))


@pytest.fixture(scope="module")
def model(case):
    return MiMoAudioForConditionalGeneration.from_pretrained(_checkpoint(case), attn_implementation="sdpa").eval()


def _waveforms(case) -> dict[str, torch.Tensor]:
    """The five recorded waveforms: three stored, the two long ones rebuilt from the speech clips as the golden
    README says (the English clip then the Chinese one, repeated, cut at the manifest's sample count)."""
    golden, manifest = _golden(case)
    waves = {name: golden[f"wav24k.{name}"] for name in ("en_w", "zh_m", "tiny")}
    clips = [
        sf.read(AUDIO / name, dtype="float32")[0] for name in ("prompt_speech_en_w.wav", "prompt_speech_zh_m.wav")
    ]
    base = torch.cat([torch.from_numpy(clip) for clip in clips])
    for name in ("long_merge", "long_split"):
        samples = manifest["audios"][name]["samples"]
        waves[name] = base.repeat(samples // base.numel() + 1)[:samples]
    return waves


def _grid(inputs, group_size, index=0, generated_from=None):
    """Our inputs as the original's `[C+1, frames]` grid: a text id at each patch's first frame (-100 elsewhere) in
    the prompt, repeated over the patch for generated positions (as the original's generate returns them)."""
    mask = inputs["attention_mask"][index].bool()
    text, audio = inputs["input_ids"][index][mask], inputs["audio_input_ids"][index][mask]
    row = torch.full((text.shape[0] * group_size,), -100, dtype=torch.long)
    row[::group_size] = text
    if generated_from is not None:
        row[generated_from * group_size :] = text[generated_from:].repeat_interleave(group_size)
    return torch.cat([row[None], audio.reshape(-1, audio.shape[-1]).T])


def _language(prompt_name):
    return {"auto": None, "zh": "zh", "en": "en"}[prompt_name.split(".")[1]]


# ------------------------------------------------------------------------------------------------------- loading


def test_original_directory_loads_with_every_entry_point(case):
    """AutoConfig / AutoModel / the model class read the V2.5 config (architectures MiMoV2ASRForCausalLM, qwen2 type)
    as MiMo-Audio with the V2.5 variant; its tensors are those of the MiMo-Audio case they were copied from."""
    original = json.loads((_checkpoint(case) / "config.json").read_text())
    assert original["architectures"] == [V25_ASR_ARCHITECTURE] and original["model_type"] == "qwen2"
    config = AutoConfig.from_pretrained(_checkpoint(case))
    assert isinstance(config, MiMoAudioConfig) and config.model_variant == "mimo-v2.5-asr"
    assert config.text_config.num_hidden_layers == original["num_hidden_layers"]
    assert config.text_config.layer_types == original["layer_types"]
    assert config.patch_encoder_config.num_hidden_layers == original["input_local_layers"]
    assert config.audio_empty_ids == [int(x) for x in original["speech_zeroemb_idx"].split("-")]
    model = AutoModel.from_pretrained(_checkpoint(case))
    assert type(model) is MiMoAudioForConditionalGeneration and model.config.model_variant == "mimo-v2.5-asr"
    reference = MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / SAME_TENSORS_AS[case] / "checkpoint")
    assert reference.config.model_variant == "mimo-audio"
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_unread_keys_are_recorded_not_dropped(case):
    """Every key of the original config either builds the model or is kept unchanged in `original_extra_config`; of
    the nested `audio_config`, the values that repeat the flat config equal what the model is built with and the
    rest is kept."""
    from transformers_mimo.conversion_mapping_mimo_audio import _READ_ORIGINAL_KEYS

    original = json.loads((_checkpoint(case) / "config.json").read_text())
    config = MiMoAudioConfig.from_pretrained(_checkpoint(case))
    extra = config.original_extra_config
    for key, value in original.items():
        if key != "audio_config":
            assert (key in _READ_ORIGINAL_KEYS) != (key in extra), key
            assert key not in extra or extra[key] == value, key
    for key in ("n_rvq", "mlp_layers", "no_speech_loss", "no_text_loss", "add_input_local_transformer"):
        assert extra[key] == original[key], key
    built = {
        "audio_channels": config.audio_channels,
        "group_size": config.group_size,
        "input_full_attention": config.input_full_attention,
        "input_local_attn_heads": config.patch_encoder_config.num_attention_heads,
        "input_local_dim": config.patch_encoder_config.hidden_size,
        "input_local_head_dim": config.patch_encoder_config.head_dim,
        "input_local_intermediate_size": config.patch_encoder_config.intermediate_size,
        "input_local_layers": config.patch_encoder_config.num_hidden_layers,
        "out_hidden_size": config.text_config.hidden_size,
        "rope_theta": config.text_config.rope_parameters["rope_theta"],
        "speech_vocab_size": "-".join(map(str, config.audio_vocab_sizes)),
        "speech_zeroemb_idx": "-".join(map(str, config.audio_empty_ids)),
    }
    kept = extra.get("audio_config", {})
    for key, value in original["audio_config"].items():
        if key in built:
            assert key not in kept and value == built[key], key
        elif key != "input_local_hidden_dropout":  # repeats `local_hidden_dropout` (itself kept at the top level)
            assert kept[key] == value, key


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["audio_config"].update(input_local_layers=c["input_local_layers"] + 1),
            "audio_config.input_local_layers",
        ),
        (lambda c: c["audio_config"].update(out_hidden_size=c["hidden_size"] * 2), "audio_config.out_hidden_size"),
        (lambda c: c["audio_config"].update(speech_zeroemb_idx="1-2-3-4-5-6-7-8"), "audio_config.speech_zeroemb_idx"),
        (
            lambda c: c["audio_config"].update(input_local_attn_heads=c["local_attn_heads"] * 2),
            "audio_config.input_local_attn_heads",
        ),
        (lambda c: c.update(local_rotary_base=c["rope_theta"] / 2), "local_rotary_base"),
        (lambda c: c.update(layer_types=c["layer_types"][:-1]), "layer_types"),
        (lambda c: c.update(n_rvq=c["audio_channels"] - 1), "n_rvq"),
    ],
)
def test_contradictions_are_clear_errors(tmp_path, edit, message):
    shutil.copytree(_checkpoint("v25_lm_a"), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"contradicts itself: `?{message}"):
        MiMoAudioConfig.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="contradicts itself"):
        AutoModel.from_pretrained(tmp_path / "ckpt")


def test_conversion_remembers_v25_and_mimo_audio_keeps_its_recipe(tmp_path):
    """`mimo-audio convert lm` on the V2.5 directory: the converted config, processor and generation config say V2.5
    (greedy text, stop on eos / <|im_end|>); the processor reloads with the V2.5 recipe and gives the golden codes.
    A MiMo-Audio conversion stays MiMo-Audio (sampling defaults, its own recipe)."""
    from transformers_mimo import cli

    case = "v25_lm_a"
    output = tmp_path / "v25"
    argv = [
        "convert",
        "lm",
        "--input_dir",
        str(_checkpoint(case)),
        "--tokenizer_dir",
        str(_codec_dir(case)),
        "--output_dir",
        str(output),
        "--verify",
    ]
    assert cli.main(argv) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "mimo_audio" and config["model_variant"] == "mimo-v2.5-asr"
    assert config["original_extra_config"]["n_rvq"] == 20
    processor = AutoProcessor.from_pretrained(output)
    assert processor.model_variant == "mimo-v2.5-asr"
    generation = GenerationConfig.from_pretrained(output)
    tokenizer = processor.tokenizer
    assert generation.do_sample is False
    assert generation.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    golden, _ = _golden(case)
    (patches,) = processor.encode_audio((golden["wav24k.tiny"], 24000))
    assert torch.equal(patches.reshape(-1), golden["codes.tiny"])
    model = AutoModel.from_pretrained(output)
    assert model.config.model_variant == "mimo-v2.5-asr" and model.generation_config.do_sample is False

    mimo_audio = convert(GOLDEN / "lm_a" / "checkpoint", tmp_path / "lm_a", tokenizer_dir=_codec_dir(case))
    assert json.loads((mimo_audio / "config.json").read_text())["model_variant"] == "mimo-audio"
    assert AutoProcessor.from_pretrained(mimo_audio).model_variant == "mimo-audio"
    assert GenerationConfig.from_pretrained(mimo_audio).do_sample is True


# ---------------------------------------------------------------------------------------------------- audio recipe


def test_codes_equal_the_v25_recipe_in_one_codec_batch(case, processor, monkeypatch):
    """All five recorded waveforms (shorter than n_fft, one chunk, a merged tail, a short last chunk) give exactly
    the recorded codes, and all their chunks go through the codec in ONE encode call."""
    golden, manifest = _golden(case)
    waves = _waveforms(case)
    calls = []
    encode = processor.audio_tokenizer.encode
    monkeypatch.setattr(
        processor.audio_tokenizer, "encode", lambda *a, **k: calls.append(a[0].shape) or encode(*a, **k)
    )
    patches = processor.encode_audio([(wave, 24000) for wave in waves.values()])
    chunk = 30 * 24000
    assert len(calls) == 1 and calls[0][0] == sum(
        max(1, -(-w.numel() // chunk) - (0 < w.numel() % chunk < 960)) for w in waves.values()
    )
    for (name, wave), clip in zip(waves.items(), patches):
        expected = golden[f"codes.{name}"]
        frames = manifest["audios"][name]["frames"]
        assert clip.shape == (frames // processor.group_size, processor.group_size, processor.audio_channels), name
        assert torch.equal(clip.reshape(-1), expected), name


def test_codes_inside_the_prompt(case, processor):
    """The long recordings' codes are the audio positions of their ASR prompt (between <|sosp|> and <|eosp|>)."""
    golden, _ = _golden(case)
    waves = _waveforms(case)
    inputs = processor.asr([(waves["long_split"], 24000), (waves["tiny"], 24000)], instruction="x")
    for index, name in enumerate(("long_split", "tiny")):
        mask = inputs["attention_mask"][index].bool()
        ids, audio = inputs["input_ids"][index][mask], inputs["audio_input_ids"][index][mask]
        start = int((ids == processor.sosp_token_id).nonzero()[0, 0]) + 1
        end = int((ids == processor.eosp_token_id).nonzero()[0, 0])
        assert torch.equal(audio[start:end].reshape(-1), golden[f"codes.{name}"]), name


# ---------------------------------------------------------------------------------------------------------- prompts


def test_prompt_grids_with_the_original_instruction_draw(case, processor):
    """`random.seed(n); processor.asr(audio, language)` reproduces the recorded prompt exactly, with the same drawn
    instruction; the same prompt comes from apply_chat_template with `language=`."""
    golden, manifest = _golden(case)
    for name, info in manifest["prompts"].items():
        clip = (golden[f"wav24k.{name.split('.')[0]}"], 24000)
        random.seed(info["random_seed_before_call"])
        inputs = processor.asr(clip, language=_language(name))
        assert torch.equal(_grid(inputs, processor.group_size), golden[f"prompt.{name}.grid"]), name
        conversation = [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": clip[0]}, {"type": "text", "text": info["template"]}],
            }
        ]
        via_template = processor.apply_chat_template(conversation, language=_language(name))
        assert torch.equal(_grid(via_template, processor.group_size), golden[f"prompt.{name}.grid"]), name
        random.seed(info["random_seed_before_call"])
        pool = (
            V25_ASR_INSTRUCTIONS[_language(name)]
            if _language(name)
            else V25_ASR_INSTRUCTIONS["zh"] + V25_ASR_INSTRUCTIONS["en"]
        )
        assert random.choice(pool) == info["template"], name


# ------------------------------------------------------------------------------------------------------- generation


def test_greedy_generation_and_transcripts(case, processor, model):
    """All six prompts in one left-padded batch, greedy (as recorded): every generation equals the recorded grid;
    a run that stopped on eos / <|im_end|> decodes to the original's `asr_sft_result`. A run that ran out of length
    keeps its last token (the original drops it: docs/differences.md), so its text without that token is the
    original's."""
    golden, manifest = _golden(case)
    names = list(manifest["prompts"])
    features = [
        processor.asr(
            (golden[f"wav24k.{name.split('.')[0]}"], 24000),
            language=_language(name),
            instruction=manifest["prompts"][name]["template"],
        )
        for name in names
    ]
    length = max(f["input_ids"].shape[1] for f in features)
    inputs = {
        key: torch.cat(
            [
                torch.cat([fill.expand(1, length - f["input_ids"].shape[1], *f[key].shape[2:]), f[key]], dim=1)
                for f in features
            ]
        )
        for key, fill in (
            ("input_ids", torch.tensor(processor.tokenizer.pad_token_id)),
            ("audio_input_ids", torch.tensor(processor.audio_empty_ids).expand(processor.group_size, -1)),
            ("attention_mask", torch.tensor(0)),
        )
    }
    kwargs = {**processor.generation_kwargs("asr"), "do_sample": False, "audio_do_sample": False}
    output = model.generate(**inputs, **kwargs, max_new_tokens=12, return_dict_in_generate=True)
    decoded = processor.batch_decode_generation(output, prompt_length=length, decode_audio=False)
    stops = torch.tensor(kwargs["eos_token_id"])
    for index, name in enumerate(names):
        prompt = features[index]["input_ids"].shape[1]
        expected = golden[f"gen.{name}.grid"]
        generated = (expected.shape[1] // processor.group_size) - prompt
        padding = length - prompt
        row = {
            "input_ids": output.sequences[index : index + 1, padding : length + generated],
            "audio_input_ids": output.audio_sequences[index : index + 1, padding : length + generated],
            "attention_mask": torch.ones(1, prompt + generated, dtype=torch.long),
        }
        assert torch.equal(_grid(row, processor.group_size, generated_from=prompt), expected), name
        new_tokens = output.sequences[index, length : length + generated]
        reference = manifest["generation"][name]["asr_sft_result"]
        if torch.isin(new_tokens[-1:], stops).item():
            assert decoded.text[index] == reference, name
        else:
            assert generated == 12
            truncated = processor.batch_decode_generation(new_tokens[None, :-1], decode_audio=False).text[0]
            assert truncated == reference, name
            assert (
                decoded.text[index] == processor.batch_decode_generation(new_tokens[None], decode_audio=False).text[0]
            )


def test_transcript_cleanup_follows_the_original():
    """Strip, drop <|empty|>/<|eot|>/<|eostm|>, then drop the language tags (and strip again) only when one is there."""
    from transformers_mimo.prompting_mimo_audio import clean_v25_transcript as _clean_v25_transcript

    assert _clean_v25_transcript(" <english> Hello<|empty|> world<|eot|> ") == "Hello world"
    assert _clean_v25_transcript("<chinese>你好<|eostm|>") == "你好"
    assert _clean_v25_transcript("<|empty|> hi ") == " hi"  # no tag: the original does not strip again
    assert _clean_v25_transcript("<think>x<|SpeechLM|>") == "<think>x<|SpeechLM|>"


def test_bf16_runs_and_completes(case):
    """bf16 model and codec: the prompt codes agree with the fp32 golden codes on most positions (measured 94-100%,
    channel 0 at least 98%; bf16 rounding moves a few quantizer decisions) and greedy generation finishes."""
    golden, _ = _golden(case)
    processor = MiMoAudioProcessor.from_pretrained(
        _checkpoint(case), audio_tokenizer=_codec_dir(case), dtype=torch.bfloat16
    )
    model = MiMoAudioForConditionalGeneration.from_pretrained(_checkpoint(case), dtype=torch.bfloat16).eval()
    (patches,) = processor.encode_audio((golden["wav24k.zh_m"], 24000))
    agreement = (patches.reshape(-1) == golden["codes.zh_m"]).float().mean().item()
    assert agreement > 0.9
    inputs = processor.asr((golden["wav24k.en_w"], 24000), language="en")
    output = model.generate(
        **inputs, **processor.generation_kwargs("asr"), max_new_tokens=6, return_dict_in_generate=True
    )
    assert output.sequences.shape[1] <= inputs["input_ids"].shape[1] + 6
    assert isinstance(
        processor.batch_decode_generation(output, prompt_length=inputs["input_ids"].shape[1]).text[0], str
    )


# ------------------------------------------------------------------------------------------------------- bad input


def test_bad_input(tmp_path, processor):
    with pytest.raises(ValueError, match="`language` must be 'zh', 'en' or None"):
        processor.asr((torch.zeros(2400), 24000), language="fr")
    with pytest.raises(ValueError, match="empty"):
        processor.asr((torch.zeros(0), 24000), language="en")
    with pytest.raises(ValueError, match="`language` has 1 entries for 2 samples"):
        processor.asr([(torch.zeros(2400), 24000)] * 2, language=["en"])
    # documented results: a 1-sample file is zero-padded to n_fft (one frame -> one patch); silence gives codes
    one = tmp_path / "one.wav"
    sf.write(one, [0.1], 24000)
    assert processor.encode_audio(str(one))[0].shape == (1, processor.group_size, processor.audio_channels)
    assert processor.asr((torch.zeros(24000), 24000))["input_ids"].shape[0] == 1


def test_mimo_audio_keeps_its_prompt_and_refuses_tags():
    processor = MiMoAudioProcessor.from_pretrained(
        GOLDEN / "lm_a" / "checkpoint", audio_tokenizer=GOLDEN / "tok_a" / "checkpoint"
    )
    assert processor.model_variant == "mimo-audio"
    for language in ("zh", "en", ["en"]):
        with pytest.raises(ValueError, match="needs a MiMo-V2.5-ASR checkpoint"):
            processor.asr((torch.zeros(2400), 24000), language=language)
        with pytest.raises(ValueError, match="needs a MiMo-V2.5-ASR checkpoint"):
            processor.apply_chat_template([{"role": "user", "content": "hi"}], language=language)
    random.seed(1)
    first = processor.asr((torch.zeros(2400), 24000))["input_ids"]
    random.seed(2)
    assert torch.equal(processor.asr((torch.zeros(2400), 24000))["input_ids"], first)  # fixed instruction, no draw
    with pytest.raises(ValueError, match="at least 481 are needed"):  # its recipe needs n_fft // 2 + 1 samples
        processor.encode_audio((torch.zeros(100), 24000))


# ---------------------------------------------------------------------------------------------------- fine-tuning


def test_collator_trains_the_tag_and_transcript_after_the_inference_prompt(case, processor):
    """A V2.5 training sample (answer = language tag + transcript) starts with exactly the inference prompt for no
    language; the collator trains the tag, the transcript and the turn end, nothing before."""
    golden, _ = _golden(case)
    clip = {"type": "audio", "audio": golden["wav24k.en_w"]}
    instruction = V25_ASR_INSTRUCTIONS["en"][0]
    sample = processor.apply_chat_template(
        [
            {"role": "user", "content": [clip, {"type": "text", "text": instruction}]},
            {"role": "assistant", "content": "<english>hello world", "thinking": ""},
        ],
        add_generation_prompt=False,
    )
    prompt = processor.asr((golden["wav24k.en_w"], 24000), instruction=instruction)
    tagged = processor.asr((golden["wav24k.en_w"], 24000), language="en", instruction=instruction)
    length = prompt["input_ids"].shape[1]
    assert torch.equal(sample["input_ids"][:, :length], prompt["input_ids"])
    assert torch.equal(sample["input_ids"][:, : tagged["input_ids"].shape[1]], tagged["input_ids"])
    batch = MiMoAudioDataCollator(processor.tokenizer, processor.audio_empty_ids)([dict(sample)])
    trained = batch["labels"][0] != -100
    assert not trained[:length].any() and trained[length:].all()
    text = processor.tokenizer.decode(batch["labels"][0][trained].tolist())
    assert text == "<english>hello world<|im_end|>\n"


def test_finetune_example_on_v25(tmp_path):
    import importlib.util

    path = GOLDEN.parents[2] / "examples" / "finetune_lora.py"
    spec = importlib.util.spec_from_file_location("finetune_lora_v25", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(
        ["--model", str(_checkpoint("v25_lm_a")), "--audio_tokenizer", str(_codec_dir("v25_lm_a")), "--steps", "3"]
    )
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]


def test_cli_encodes_v25_audio_with_its_recipe(case, processor):
    """The CLI's pre-encoding of audio files (used by `understand` / `chat`) follows the checkpoint's recipe."""
    from transformers_mimo import cli

    golden, _ = _golden(case)
    item = cli._encoded_audio(processor, str(AUDIO / "prompt_speech_en_w.wav"))
    assert torch.equal(item["audio_codes"].T.reshape(-1), golden["codes.en_w"])


def test_a_null_audio_config_is_kept(tmp_path):
    shutil.copytree(_checkpoint("v25_lm_a"), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    config["audio_config"] = None
    path.write_text(json.dumps(config))
    loaded = MiMoAudioConfig.from_pretrained(tmp_path / "ckpt")
    assert loaded.model_variant == "mimo-v2.5-asr" and loaded.original_extra_config["audio_config"] is None
