"""Transformers' pipelines on a tiny converted checkpoint (issue 17, item 10): `any-to-any` answers a conversation with
audio input in text, and in speech with `generation_mode="audio"`; `text-to-speech` reads a text (or a chat) aloud."""

import json

import numpy as np
import pytest
import torch
from conftest import GOLDEN
from transformers import LogitsProcessor, LogitsProcessorList, VitsConfig, VitsModel, VitsTokenizer, pipeline
from transformers.pipelines.text_to_audio import TextToAudioPipeline

from transformers_mimo import MiMoAudioTextToAudioPipeline
from transformers_mimo.convert_mimo_audio_to_hf import convert


class ForceToken(LogitsProcessor):
    def __init__(self, token_id):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.token_id] = 0.0
        return forced


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipeline") / "hf"
    convert(GOLDEN / "lm_b" / "checkpoint", directory, tokenizer_dir=GOLDEN / "tok_b" / "checkpoint")
    return str(directory)


@pytest.fixture(scope="module")
def any_to_any(converted):
    return pipeline("any-to-any", model=converted)


@pytest.fixture(scope="module")
def text_to_speech(converted):
    return pipeline("text-to-speech", model=converted)


@pytest.fixture
def conversation():
    wave = (0.3 * np.sin(np.arange(24000) / 24000 * 2 * np.pi * 220)).astype(np.float32)
    return [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": "What is this?"}]}]


def test_any_to_any_answers_in_text(any_to_any, conversation):
    processor, model = any_to_any.processor, any_to_any.model
    output = any_to_any(
        text=conversation, generate_kwargs={"max_new_tokens": 4, "do_sample": False, "audio_do_sample": False}
    )
    answer = output[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    inputs = processor.apply_chat_template(conversation)
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, audio_do_sample=False)
    # the pipeline decodes prompt and answer together and strips the decoded prompt
    full = processor.tokenizer.decode(expected.sequences[0], skip_special_tokens=True)
    prompt = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert full.startswith(prompt) and answer["content"] == full[len(prompt) :]
    assert len(answer["content"]) > 0


def test_any_to_any_answers_in_speech(any_to_any, conversation):
    processor = any_to_any.processor
    force_audio = LogitsProcessorList([ForceToken(processor.empty_token_id)])
    output = any_to_any(
        text=conversation,
        generation_mode="audio",
        processor_kwargs={"output_modality": "audio"},
        generate_kwargs={"max_new_tokens": 3, "do_sample": False, "logits_processor": force_audio},
    )
    audio = output[0]["generated_audio"]
    # 3 patches x 4 frames at 25 Hz, each frame 960 samples at 24 kHz
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.shape == (3 * 4 * 960,)
    with pytest.raises(ValueError, match="output_modality='audio'"):
        any_to_any(text=conversation, generation_mode="audio", generate_kwargs={"max_new_tokens": 2})


def test_text_to_speech_reads_a_text_as_processor_tts_and_generate_do(text_to_speech):
    processor, model = text_to_speech.processor, text_to_speech.model
    assert isinstance(text_to_speech, MiMoAudioTextToAudioPipeline)
    force_audio = LogitsProcessorList([ForceToken(processor.empty_token_id)])
    torch.manual_seed(0)
    output = text_to_speech("Hello there.", generate_kwargs={"max_new_tokens": 3, "logits_processor": force_audio})
    # 3 patches x 4 frames at 25 Hz, each frame 960 samples at 24 kHz
    assert output["sampling_rate"] == 24000
    audio = output["audio"]
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.shape == (3 * 4 * 960,)
    assert np.abs(audio).max() > 0

    # by hand: the TTS layout, the task's generation settings (sampled, hence the same seed), the speech decoded
    inputs = processor.tts("Hello there.")
    torch.manual_seed(0)
    generated = model.generate(
        **inputs, **processor.generation_kwargs("tts"), max_new_tokens=3, logits_processor=force_audio
    )
    _, expected = processor.decode_generation(generated, prompt_length=inputs["input_ids"].shape[1])
    np.testing.assert_array_equal(audio, expected.numpy())


def test_text_to_speech_takes_a_chat_and_processor_kwargs(text_to_speech):
    processor, model = text_to_speech.processor, text_to_speech.model
    chat = [{"role": "user", "content": "Say: good morning"}]
    force_audio = LogitsProcessorList([ForceToken(processor.empty_token_id)])
    greedy = {"max_new_tokens": 2, "do_sample": False, "audio_do_sample": False, "logits_processor": force_audio}
    output = text_to_speech(chat, generate_kwargs=greedy)
    inputs = processor.apply_chat_template(chat, output_modality="audio")
    generated = model.generate(**inputs, **{**processor.generation_kwargs("tts"), **greedy})
    _, expected = processor.decode_generation(generated, prompt_length=inputs["input_ids"].shape[1])
    assert output["audio"].shape == (2 * 4 * 960,)
    np.testing.assert_array_equal(output["audio"], expected.numpy())

    # `processor_kwargs` go to `processor.tts` for a text; an answer without speech gives no audio
    stop = LogitsProcessorList([ForceToken(processor.im_end_token_id)])
    silent = text_to_speech(
        "Hello",
        processor_kwargs={"instruction": "Read this"},
        generate_kwargs={"max_new_tokens": 2, "logits_processor": stop},
    )
    assert silent == {"audio": None, "sampling_rate": 24000}
    with pytest.raises(TypeError, match="speed"):
        text_to_speech("Hello", processor_kwargs={"speed": 2.0})
    with pytest.raises(ValueError, match="processor_kwargs"):
        text_to_speech("Hello", preprocess_params={"speed": 2.0})


def test_text_to_speech_runs_other_models_as_the_stock_pipeline(tmp_path):
    """Importing transformers_mimo makes the task build MiMoAudioTextToAudioPipeline for every model: a tiny VITS
    model gives exactly what the stock TextToAudioPipeline gives."""
    vocab = {character: index for index, character in enumerate(["<pad>", " ", "e", "h", "l", "o"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(str(tmp_path / "vocab.json"), add_blank=False, phonemize=False)
    config = VitsConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16, flow_size=8,
        spectrogram_bins=9, upsample_initial_channel=8, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]], prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1, duration_predictor_num_flows=1,
        duration_predictor_filter_channels=8, depth_separable_num_layers=1, sampling_rate=16000,
    )  # fmt: skip
    model = VitsModel(config).eval()
    tts = pipeline("text-to-speech", model=model, tokenizer=tokenizer)
    assert type(tts) is MiMoAudioTextToAudioPipeline
    torch.manual_seed(0)  # VITS samples its durations and latents
    output = tts("hello")
    torch.manual_seed(0)
    expected = TextToAudioPipeline(model=model, tokenizer=tokenizer)("hello")
    assert output["sampling_rate"] == expected["sampling_rate"] == 16000
    assert output["audio"].shape == expected["audio"].shape and output["audio"].size > 0
    np.testing.assert_array_equal(output["audio"], expected["audio"])
