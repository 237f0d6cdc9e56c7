"""Transformers' `any-to-any` pipeline on a tiny converted checkpoint (issue 17, item 10): a conversation with audio
input answered in text, and in speech with `generation_mode="audio"`."""

import numpy as np
import pytest
import torch
from conftest import GOLDEN
from transformers import LogitsProcessor, LogitsProcessorList, pipeline

from transformers_mimo.convert_mimo_audio_to_hf import convert


class ForceToken(LogitsProcessor):
    def __init__(self, token_id):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.token_id] = 0.0
        return forced


@pytest.fixture(scope="module")
def any_to_any(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipeline") / "hf"
    convert(GOLDEN / "lm_b" / "checkpoint", directory, tokenizer_dir=GOLDEN / "tok_b" / "checkpoint")
    return pipeline("any-to-any", model=str(directory))


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
