"""The prompt-layout module: the task registry drives the processor's task methods, `generation_kwargs` and the
answer's opening; a new task is one registry entry plus one call of the processor's `_task_inputs`; the decoding
helpers read the layout backwards. (The layouts themselves are checked against the original in
test_processing_mimo_audio.py and test_v25_asr.py.)"""

import pytest
import torch
from conftest import GOLDEN

from transformers_mimo import MiMoAudioProcessor
from transformers_mimo.prompting_mimo_audio import (
    TASKS,
    ChatPrompt,
    MiMoAudioTask,
    answer_text_end,
    build_tts_prompt,
    clean_answer_text,
    speech_stream_span,
    text_item,
)


@pytest.fixture(scope="module")
def processor():
    return MiMoAudioProcessor.from_pretrained(GOLDEN / "lm_a" / "checkpoint")


def _codes(frames: int, channels: int = 8) -> dict:
    return {"type": "audio", "audio_codes": torch.arange(frames * channels).reshape(channels, frames) % 16}


def _tokens(processor, *texts) -> list[int]:
    return [token for text in texts for token in processor.tokenizer(text, add_special_tokens=False)["input_ids"]]


def _prompt_end(processor, inputs, length: int) -> list[int]:
    return inputs["input_ids"][0, -length:].tolist()


@pytest.mark.parametrize(
    "task, build, opening",
    [
        ("asr", lambda p: p.asr(_codes(8)), "<think>\n\n</think>\n"),
        ("audio_understanding", lambda p: p.audio_understanding(_codes(8), "What?"), "<think>\n\n</think>\n"),
        ("audio_understanding", lambda p: p.audio_understanding(_codes(8), "What?", thinking=True), "<think>\n"),
        ("text_dialogue", lambda p: p.text_dialogue("Hi"), "<think>\n\n</think>\n"),
        ("text_dialogue", lambda p: p.text_dialogue("Hi", thinking=True), "<think>\n"),
        (
            "speech_to_text_dialogue",
            lambda p: p.spoken_dialogue([{"role": "user", "content": "Hi"}], output_modality="text"),
            "<think>\n\n</think>\n",
        ),
        ("tts", lambda p: p.tts("Hello"), "<|sostm|>"),
        ("tts", lambda p: p.tts("Hello", style="slowly"), "<think>\n"),
        ("spoken_dialogue", lambda p: p.spoken_dialogue([{"role": "user", "content": [_codes(8)]}]), "<|sostm|>"),
        ("in_context_learning", lambda p: p.in_context_learning(_codes(8), [], "Copy."), "\n<|sostm|>"),
    ],
)
def test_each_task_opens_its_answer_as_its_registry_entry_says(processor, task, build, opening):
    """Text answers open with the empty thinking block, speech answers with `<|sostm|>`, and a task whose entry
    allows it reasons first (`<think>\\n`) when asked."""
    entry = TASKS[task]
    expected = _tokens(processor, opening)
    assert _prompt_end(processor, build(processor), len(expected)) == expected
    if opening == "<think>\n":
        assert entry.thinking
    else:
        assert ("<|sostm|>" in opening) == (entry.output_modality == "audio")


def test_speech_continuation_ends_inside_the_open_speech_segment(processor):
    entry = TASKS["speech_continuation"]
    inputs = processor.speech_continuation(_codes(8))
    assert entry.output_modality == "audio" and entry.stop_tokens == ("eosp_token",)
    assert inputs["input_ids"][0].tolist() == [processor.sosp_token_id] + [processor.empty_token_id] * 2


def test_generation_kwargs_read_the_registry(processor):
    for name, entry in TASKS.items():
        stops = [processor.tokenizer.eos_token_id] + [getattr(processor, f"{t}_id") for t in entry.stop_tokens]
        expected = {"eos_token_id": stops, **entry.text_sampling, **entry.audio_sampling}
        assert processor.generation_kwargs(name) == expected, name
    with pytest.raises(ValueError, match="Unknown task 'chat'"):
        processor.generation_kwargs("chat")


def test_a_new_task_is_one_registry_entry_and_one_thin_method(processor, monkeypatch):
    """The worked example of docs/architecture.md: a speech translation task."""

    def build_speech_translation_prompt(audio: dict, target_language: str) -> ChatPrompt:
        request = f"Translate the speech into {target_language}."
        return ChatPrompt([{"role": "user", "content": [audio, text_item(request)]}])

    sampling = {"do_sample": True, "temperature": 0.3, "top_k": 0, "top_p": 0.95}
    entry = MiMoAudioTask(build_speech_translation_prompt, "text", False, ("im_end_token",), sampling)
    monkeypatch.setitem(TASKS, "speech_translation", entry)
    audio = [_codes(8), _codes(4)]
    inputs = processor._task_inputs(
        "speech_translation", [{"audio": item, "target_language": "French"} for item in audio]
    )

    patches = processor.encode_audio(audio[0])[0]
    header = _tokens(processor, "<|im_start|>user\n")
    assert inputs["input_ids"][0].tolist() == (
        header
        + [processor.sosp_token_id]
        + [processor.empty_token_id] * patches.shape[0]
        + [processor.eosp_token_id]
        + _tokens(processor, "Translate the speech into French.", "<|im_end|>\n")
        + _tokens(processor, "<|im_start|>assistant\n", "<think>\n\n</think>\n")
    )
    start = len(header) + 1
    assert torch.equal(inputs["audio_input_ids"][0, start : start + patches.shape[0]], patches)
    assert inputs["attention_mask"][1].tolist()[0] == 0  # the shorter prompt is padded on the left
    assert processor.generation_kwargs("speech_translation") == {
        "eos_token_id": [processor.tokenizer.eos_token_id, processor.im_end_token_id],
        **sampling,
        "audio_do_sample": True,
        "audio_temperature": 0.9,
        "audio_top_k": 0,
        "audio_top_p": 0.95,
    }


def test_a_builder_cannot_open_with_reasoning_for_a_task_without_it(processor):
    entry = MiMoAudioTask(build_tts_prompt, "audio", False, ("eostm_token",), {"do_sample": False})
    sample = {"text": "Hi", "instruction": None, "style": "calm", "voice": None, "natural": False}
    with pytest.raises(ValueError, match="does not open with reasoning"):
        entry.prompt_pieces(**sample)
    assert entry.prompt_pieces(**{**sample, "style": None})[-1].text == "<|sostm|>"


def test_chat_prompts_are_checked_with_the_sample_index(processor):
    with pytest.raises(ValueError, match="Conversation 1, message 0: unknown role 'bot'"):
        processor.text_dialogue(["Hi", [{"role": "bot", "content": "Hello"}]])


def test_decoding_reads_the_layout_backwards():
    ids = torch.tensor([5, 7, 1, 9, 2, 7])
    assert answer_text_end(ids, [7, 8]) == 1 and answer_text_end(ids, [3]) == 6
    assert speech_stream_span(ids, sostm_token_id=1, eostm_token_id=2) == (3, 4)
    assert speech_stream_span(ids, sostm_token_id=3, eostm_token_id=4) == (0, 6)  # no markers: everything
    assert speech_stream_span(ids, sostm_token_id=9, eostm_token_id=1) == (4, 2)  # ends before it starts: none
    assert clean_answer_text(" Hi<|empty|> there<|eot|><|eostm|> ") == "Hi there"
    assert clean_answer_text("<english> Hi<|eot|>", "mimo-audio") == "<english> Hi"
    assert clean_answer_text("<english> Hi<|eot|>", "mimo-v2.5-asr") == "Hi"
