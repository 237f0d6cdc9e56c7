"""Bad input gets a clear `ValueError` naming the argument, before any heavy work (issue 17, item 6), and `generate`
follows Transformers' conventions at its entry (item 1)."""

import shutil

import pytest
import torch
from conftest import GOLDEN
from transformers import AutoTokenizer
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from transformers_mimo import MiMoAudioForConditionalGeneration, MiMoAudioProcessor, MiMoAudioTokenizerModel
from transformers_mimo.convert_mimo_audio_to_hf import convert
from transformers_mimo.feature_extraction_mimo_audio import MiMoAudioFeatureExtractor
from transformers_mimo.generation_mimo_audio import MiMoAudioGenerateOutput


@pytest.fixture(scope="module")
def model():
    return MiMoAudioForConditionalGeneration.from_pretrained(GOLDEN / "lm_b" / "checkpoint").eval()


@pytest.fixture(scope="module")
def processor():
    codec = MiMoAudioTokenizerModel.from_pretrained(GOLDEN / "tok_b" / "checkpoint").eval()
    return MiMoAudioProcessor(
        MiMoAudioFeatureExtractor.from_audio_tokenizer_config(codec.config),
        AutoTokenizer.from_pretrained(GOLDEN / "lm_b" / "checkpoint"),
        audio_tokenizer=codec,
        audio_empty_ids=[32, 32, 8, 8, 8, 8, 8, 8],
    )


@pytest.mark.parametrize("bad_id", [-1, 448, 10**6])
def test_input_ids_outside_the_vocabulary(model, bad_id):
    input_ids = torch.tensor([[1, 2, bad_id]])
    with pytest.raises(ValueError, match=r"`input_ids` holds ids outside the text vocabulary \[0, 448\)"):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match="`input_ids` holds ids outside the text vocabulary"):
        model.generate(input_ids, max_new_tokens=2)


def test_attention_mask_of_another_shape(model):
    input_ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape .* = \(1, 3\), got \(1, 5\)"):
        model(input_ids=input_ids, attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"`attention_mask` must have the shape of `input_ids` \(1, 3\), got \(2, 3\)"
    ):
        model.generate(input_ids, attention_mask=torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)


def test_empty_prompt(model):
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="`input_ids` is an empty prompt"):
        model.generate(empty, max_new_tokens=2)
    with pytest.raises(ValueError, match="`input_ids` is empty"):
        model(input_ids=empty)


def test_audio_positions_without_audio_input_ids(model):
    input_ids = torch.tensor([[1, model.config.empty_token_id, 3]])
    with pytest.raises(ValueError, match="holds audio positions .* but `audio_input_ids` is None"):
        model.generate(input_ids, max_new_tokens=2)


def test_generate_returns_sequences_tensor_without_dict_and_starts_from_bos(model):
    input_ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    output = model.generate(input_ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    tensor = model.generate(
        input_ids, max_new_tokens=4, do_sample=False, eos_token_id=None, return_dict_in_generate=False
    )
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 7) and torch.equal(tensor, output.sequences)
    assert output.audio_sequences.shape == (2, 7, 4, 8)

    start = model.generate(max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert start.sequences.shape == (1, 4) and start.sequences[0, 0] == model.config.im_start_token_id
    expected = model.generate(
        torch.tensor([[model.config.im_start_token_id]]), max_new_tokens=3, do_sample=False, eos_token_id=None
    )
    assert torch.equal(start.sequences, expected.sequences)
    from_bos = model.generate(bos_token_id=7, max_new_tokens=2, do_sample=False, eos_token_id=None)
    assert from_bos.sequences[0, 0] == 7


def test_converted_generation_config_and_max_new_tokens_do_not_clash(tmp_path):
    source = tmp_path / "lm"
    shutil.copytree(GOLDEN / "lm_b" / "checkpoint", source)
    converted = convert(source, tmp_path / "hf")
    model = MiMoAudioForConditionalGeneration.from_pretrained(converted).eval()
    assert model.generation_config.return_dict_in_generate is True and model.generation_config.max_length is None
    logger = logging.get_logger("transformers.generation.utils")
    with CaptureLogger(logger) as captured:
        output = model.generate(torch.tensor([[1, 2]]), max_new_tokens=3, eos_token_id=None)
    assert "Both `max_new_tokens`" not in captured.out
    assert output.sequences.shape == (1, 5)


def test_precomputed_codes_given_as_frames_by_channels(processor):
    codes = torch.randint(0, 8, (10, 50))  # (quantizers, frames): fine
    inputs = processor.asr({"type": "audio", "audio_codes": codes})
    assert inputs["audio_input_ids"].shape[-2:] == (4, 8)
    with pytest.raises(ValueError, match=r"`audio_codes` has shape \(50, 10\), which looks like \(frames, num_quant"):
        processor.asr({"type": "audio", "audio_codes": codes.T})


def test_waveform_given_as_samples_by_channels(processor):
    stereo = torch.zeros(2, 24000).uniform_(-0.1, 0.1)
    inputs = processor.asr({"type": "audio", "audio": stereo})  # (channels, samples): downmixed
    assert inputs["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match=r"\(24000, 2\), which looks like \(samples, channels\); pass stereo"):
        processor.asr({"type": "audio", "audio": stereo.T})


# ------------------------------------------------------------------------------- processor conventions (item 4)


def test_call_expands_audio_placeholders_like_the_chat_template(processor):
    codes = torch.randint(0, 8, (8, 30))
    item = {"type": "audio", "audio_codes": codes}
    text = (
        f"<|im_start|>user\n{processor.audio_token}Please convert the recording to written format<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n"
    )
    called = processor(text=text, audio=item)
    expected = processor.asr(item)
    assert set(called) == {"input_ids", "audio_input_ids", "attention_mask"}
    for key in expected:
        assert torch.equal(called[key], expected[key]), key
    # 30 frames -> 8 patches of 4 frames between <|sosp|> and <|eosp|>
    assert (called["input_ids"][0] == processor.empty_token_id).sum() == 8

    batch = processor(text=["plain text", f"a {processor.audio_token} b"], audio=[item])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0, 0] == 0  # left padded
    assert processor(text="plain text")["input_ids"].tolist() == [processor.tokenizer("plain text")["input_ids"]]
    with pytest.raises(ValueError, match=r"`text` has 2 audio placeholder\(s\) .* but `audio` has 1 clip"):
        processor(text=f"{processor.audio_token}{processor.audio_token}", audio=[item])
    with pytest.raises(ValueError, match="`text` is required"):
        processor(audio=[item])


def test_batch_decode_returns_strings_like_every_processor(processor):
    ids = [[1, 4, 5, 8, 1, 0, 8], [3, 4, 3, 1, 1, 8, 9]]
    assert processor.batch_decode(ids) == processor.tokenizer.batch_decode(ids)
    assert processor.batch_decode(torch.tensor(ids), skip_special_tokens=True) == processor.tokenizer.batch_decode(
        ids, skip_special_tokens=True
    )
    assert processor.decode(ids[0]) == processor.tokenizer.decode(ids[0])
    output = MiMoAudioGenerateOutput(sequences=torch.tensor(ids), audio_sequences=None)
    with pytest.raises(TypeError, match="batch_decode_generation"):
        processor.batch_decode(output)
    with pytest.raises(TypeError, match="decode_generation"):
        processor.decode(torch.tensor(ids[:1]), prompt_length=2)
    decoded = processor.batch_decode_generation(torch.tensor(ids), prompt_length=1, decode_audio=False)
    assert decoded.text == [processor.tokenizer.decode(row[1:]).strip() for row in ids]


def test_call_pads_on_the_left_to_max_length(processor):
    inputs = processor(text=["lower newer", "lower"], padding="max_length", max_length=9)
    assert inputs["input_ids"].shape == (2, 9)
    assert inputs["attention_mask"].sum(-1).tolist() == [
        len(processor.tokenizer(t)["input_ids"]) for t in ("lower newer", "lower")
    ]
    assert inputs["attention_mask"][:, -1].tolist() == [1, 1]  # left padding
    with pytest.raises(ValueError, match="more than `max_length` \\(2\\)"):
        processor(text="lower newer longer", padding="max_length", max_length=2)
    with pytest.raises(ValueError, match="pads on the left"):
        processor(text="lower", padding_side="right")
