"""MiMoAudioProcessor: prompt layouts (golden-exact), audio -> codes, padding, save/load, decoding, bad input."""

import copy
import json
import re
from threading import Thread

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AUDIO, GOLDEN
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

import transformers_mimo.modeling_mimo_audio_tokenizer as modeling_mimo_audio_tokenizer
import transformers_mimo.processing_mimo_audio as processing
import transformers_mimo.prompting_mimo_audio as prompting
from transformers_mimo import MiMoAudioProcessor
from transformers_mimo.feature_extraction_mimo_audio import MiMoAudioFeatureExtractor
from transformers_mimo.generation_mimo_audio import MiMoAudioGenerateOutput, MiMoAudioStreamer
from transformers_mimo.modeling_mimo_audio import MiMoAudioForConditionalGeneration
from transformers_mimo.modeling_mimo_audio_tokenizer import MiMoAudioTokenizerModel


LM_CASES = ("lm_a", "lm_b")
CODEC_OF = {"lm_a": "tok_a", "lm_b": "tok_b"}


def _golden(case):
    return load_file(GOLDEN / case / "golden.safetensors"), json.loads((GOLDEN / case / "manifest.json").read_text())


def _codec(tok_case):
    return MiMoAudioTokenizerModel.from_pretrained(GOLDEN / tok_case / "checkpoint").eval()


def _feature_extractor(codec):
    config = codec.config
    return MiMoAudioFeatureExtractor.from_audio_tokenizer_config(config)


def _processor(case, with_codec=True):
    """Processor for an LM golden case, configured from its manifest; its codec is the tok case the codes came from."""
    _, manifest = _golden(case)
    config = manifest["config_json"]
    codec = _codec(CODEC_OF[case])
    return MiMoAudioProcessor(
        _feature_extractor(codec),
        AutoTokenizer.from_pretrained(GOLDEN / case / "checkpoint"),
        audio_tokenizer=codec if with_codec else None,
        group_size=config["group_size"],
        audio_channels=config["audio_channels"],
        audio_empty_ids=[int(value) for value in config["speech_zeroemb_idx"].split("-")],
    )


@pytest.fixture(scope="module")
def proc_a():
    return _processor("lm_a")


@pytest.fixture(scope="module")
def model_a():
    """The lm_a golden checkpoint (original on-disk format, loaded directly), fp32, SDPA as in the goldens."""
    return MiMoAudioForConditionalGeneration.from_pretrained(
        GOLDEN / "lm_a" / "checkpoint", attn_implementation="sdpa"
    ).eval()


def _original_grid(inputs, group_size, index=0):
    """Flatten our inputs the original's way: `[C+1, frames]`, text at each group's first frame, -100 elsewhere."""
    mask = inputs["attention_mask"][index].bool()
    text, audio = inputs["input_ids"][index][mask], inputs["audio_input_ids"][index][mask]
    text_row = torch.full((text.shape[0] * group_size,), -100, dtype=torch.long)
    text_row[::group_size] = text
    return torch.cat([text_row[None], audio.reshape(-1, audio.shape[-1]).T])


def _codes_item(golden, name, channels):
    """Golden prompt codes (flattened frame-major) as an audio item with codes `(channels, frames)`."""
    return {"type": "audio", "audio_codes": golden[f"prompt_audio_codes.{name}"].view(-1, channels).T}


def _tokens(tokenizer, *texts):
    """The original tokenizes every prompt segment on its own."""
    return [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


# ------------------------------------------------------------------------------------------------ golden layouts


@pytest.mark.parametrize("case", LM_CASES)
def test_golden_prompt_layouts(case):
    """Every prompt recorded from the original is reproduced exactly (grid values; the original's text-only grid is
    int32, quirk 11, ours int64)."""
    golden, manifest = _golden(case)
    processor = _processor(case, with_codec=False)
    channels, group = processor.audio_channels, processor.group_size
    icl = manifest["prompts"]["icl"]["call"]
    assert "'Speak in the same voice as the example.'" in icl and "'Hello, how are you today? I am fine.'" in icl
    inputs = {
        "text": processor.text_dialogue("What is the weather like in Beijing?"),
        "asr": processor.asr(_codes_item(golden, "asr", channels), instruction=manifest["asr_template"]),
        "icl": processor.in_context_learning(
            _codes_item(golden, "icl_query", channels),
            [
                {
                    "input_audio": _codes_item(golden, "icl_in", channels),
                    "output_audio": _codes_item(golden, "icl_out", channels),
                    "output_text": "Hello, how are you today? I am fine.",
                }
            ],
            instruction="Speak in the same voice as the example.",
        ),
    }
    for name, batch in inputs.items():
        grid = _original_grid(batch, group)
        expected = golden[f"{name}.input_ids_grid"].long()
        assert grid.shape == expected.shape, name
        assert torch.equal(grid, expected), name
        assert torch.equal(grid.T.reshape(1, -1), golden[f"{name}.input_ids_flat"].long()), name
        assert batch["input_ids"].shape[1] == manifest["prompts"][name]["groups"]


def test_golden_asr_through_messages(proc_a):
    """The same ASR layout from Transformers-style messages (audio then text in the user turn)."""
    golden, manifest = _golden("lm_a")
    conversation = [
        {
            "role": "user",
            "content": [_codes_item(golden, "asr", 8), {"type": "text", "text": manifest["asr_template"]}],
        }
    ]
    grid = _original_grid(proc_a.apply_chat_template(conversation), 4)
    assert torch.equal(grid, golden["asr.input_ids_grid"])
    assert manifest["asr_template"] == prompting.DEFAULT_ASR_INSTRUCTION
    assert torch.equal(_original_grid(proc_a.asr(_codes_item(golden, "asr", 8)), 4), golden["asr.input_ids_grid"])


# ---------------------------------------------------------------------------------------- audio -> codes (real path)


@pytest.mark.parametrize("tok_case", ["tok_a", "tok_b"])
def test_waveform_to_codes_matches_original_preprocess_input(tok_case):
    """Golden wav (24 kHz, and at its native rate through the resampler) -> exactly the original's
    `preprocess_input` codes: first 8 quantizers, padded to a multiple of 4 frames by repeating the last frame."""
    golden = load_file(GOLDEN / tok_case / "golden.safetensors")
    manifest = json.loads((GOLDEN / tok_case / "manifest.json").read_text())
    codec = _codec(tok_case)
    sizes = codec.quantizer.codebook_sizes[:8]
    processor = MiMoAudioProcessor(
        _feature_extractor(codec),
        AutoTokenizer.from_pretrained(GOLDEN / "lm_a" / "checkpoint"),
        audio_tokenizer=codec,
        audio_empty_ids=sizes,
    )
    expected = golden["fp32.preprocess_input_audio_tokenized"]
    frames = golden["fp32.codes_single_segment"].shape[1]  # tok_a: 63 frames, padded to 64
    native_rate = manifest["tensors"]["wav_native"]["sample_rate"]
    patches_24k, patches_native = processor.encode_audio([golden["wav"], (golden["wav_native"], native_rate)])
    for patches in (patches_24k, patches_native):
        assert patches.shape == (expected.numel() // 32, 4, 8)
        assert torch.equal(patches.reshape(-1), expected)
        flat = patches.reshape(-1, 8)
        assert flat.shape[0] == -(-frames // 4) * 4 and (flat[frames:] == flat[frames - 1]).all()


def test_audio_file_round_trip_through_codec(proc_a, tmp_path):
    """A clip from tests/fixtures/audio (mp3 at 32 kHz) -> codes -> waveform with the tiny tok_a codec: the codes
    equal those of the decoded-and-resampled waveform passed as an array, and decoding gives 960 samples per frame."""
    path = AUDIO / "weather_today_zh.mp3"
    array, rate = sf.read(path, dtype="float32", always_2d=True)
    (from_file,) = proc_a.encode_audio(str(path))
    (from_array,) = proc_a.encode_audio((torch.from_numpy(array.T.copy()), rate))
    (from_url,) = proc_a.encode_audio({"type": "audio", "url": path.resolve().as_uri()})
    assert torch.equal(from_file, from_array) and torch.equal(from_file, from_url)
    mel_frames = int(np.ceil(array.shape[0] * 24000 / rate)) // 240 + 1
    code_frames = ((mel_frames - 1) // 2 + 1 + 1) // 2  # conv stride 2, then average pooling 2 (ceil)
    assert from_file.shape == (-(-code_frames // 4), 4, 8)
    (waveform,) = proc_a.decode_codes([from_file.reshape(-1, 8).T])
    reference = proc_a.audio_tokenizer.decode(from_file.reshape(-1, 8).T[None]).audio_values[0, 0]
    assert waveform.shape == (from_file.shape[0] * 4 * 960,)
    torch.testing.assert_close(waveform, reference, rtol=0, atol=1e-6)  # same codec call, batched with a mask
    proc_a.save_audio(waveform, tmp_path / "out.wav")
    written, written_rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert written_rate == 24000 and written.shape == (waveform.shape[0],)
    np.testing.assert_allclose(written, waveform.numpy(), atol=1 / 32768)  # 16-bit PCM


def test_precomputed_codes_are_padded_by_repeating_the_last_frame(proc_a):
    codes = torch.arange(5 * 12).reshape(12, 5) % 16  # 12 quantizers, 5 frames: the first 8 are used
    (patches,) = proc_a.encode_audio({"type": "audio", "audio_codes": codes})
    frames = patches.reshape(-1, 8)
    assert patches.shape == (2, 4, 8)
    assert torch.equal(frames[:5], codes[:8].T)
    assert torch.equal(frames[5:], codes[:8, 4:5].T.expand(3, -1))


# ------------------------------------------------------------------------------------------------ task layouts


def test_stream_layout_interleaves_five_tokens_and_five_patches(proc_a):
    """Assistant speech: <|sostm|>, 5 text tokens, 5 patches, rest of the text + <|eot|>, rest of the patches,
    <|eostm|> (the original's StreamingInputSegment)."""
    text = "Hello, how are you today? I am fine."
    ids = _tokens(proc_a.tokenizer, text) + [proc_a.eot_token_id]
    assert len(ids) == 22  # text chunks 5, 5, 5, 5, 2 (with <|eot|>)
    codes = torch.randint(0, 16, (8, 7 * 4))  # 7 patches: audio chunks 5, 2
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": text}, {"type": "audio", "audio_codes": codes}]},
    ]
    batch = proc_a.apply_chat_template(conversation, add_generation_prompt=False)
    E = proc_a.empty_token_id
    stream = [proc_a.sostm_token_id] + ids[:5] + [E] * 5 + ids[5:10] + [E] * 2 + ids[10:] + [proc_a.eostm_token_id]
    head = _tokens(proc_a.tokenizer, "<|im_start|>user\n", "hi", "<|im_end|>\n", "<|im_start|>assistant\n")
    expected = head + stream + _tokens(proc_a.tokenizer, "<|im_end|>\n")
    assert batch["input_ids"][0].tolist() == expected
    audio = batch["audio_input_ids"][0]
    speech = (batch["input_ids"][0] == E).nonzero()[:, 0]
    assert torch.equal(audio[speech].reshape(-1, 8), codes.T)
    empty = torch.tensor(proc_a.audio_empty_ids)
    others = torch.ones(len(expected), dtype=torch.bool)
    others[speech] = False
    assert (audio[others] == empty).all()


def test_tts_layouts_match_the_original_segments(proc_a):
    """TTS variants, each compared with the original's segment strings tokenized segment by segment."""
    tok = proc_a.tokenizer
    voice = torch.randint(0, 16, (8, 8))
    plain = proc_a.tts("HELLO THERE")  # one letter case only: capitalized as the original does
    assert plain["input_ids"][0].tolist() == _tokens(
        tok,
        "<|im_start|>user\nPlease convert this text to speech: Hello there<|im_end|>\n",
        "<|im_start|>assistant\n<|sostm|>",
    )
    chinese = proc_a.tts("今天天气真好")
    assert chinese["input_ids"][0].tolist() == _tokens(
        tok, "<|im_start|>user\n请将这段文字转换为语音: 今天天气真好<|im_end|>\n", "<|im_start|>assistant\n<|sostm|>"
    )
    styled = proc_a.tts("Nice day", style="happily", instruction="Read this")
    assert styled["input_ids"][0].tolist() == _tokens(
        tok,
        "<|im_start|>system\n",
        prompting.TTS_STYLE_SYSTEM_PROMPT,
        "<|im_end|>\n",
        "<|im_start|>user\nRead this: Nice day(happily)<|im_end|>\n",
        "<|im_start|>assistant\n<think>\n",
    )
    natural = proc_a.tts("Say it slowly: nice day", natural_instruction=True)
    assert natural["input_ids"][0].tolist() == _tokens(
        tok,
        "<|im_start|>system\n",
        prompting.TTS_STYLE_SYSTEM_PROMPT,
        "<|im_end|>\n",
        "<|im_start|>user\nSay it slowly: nice day<|im_end|>\n",
        "<|im_start|>assistant\n<think>\n",
    )
    cloned = proc_a.tts("Nice day", style="calm", voice={"type": "audio", "audio_codes": voice})
    E = proc_a.empty_token_id
    assert cloned["input_ids"][0].tolist() == (
        _tokens(tok, "<|im_start|>system\n", prompting.TTS_VOICE_SYSTEM_PROMPT)
        + [proc_a.sosp_token_id, E, E, proc_a.eosp_token_id]
        + _tokens(
            tok,
            "<|im_end|>\n",
            "<|im_start|>user\nPlease convert this text to speech: Nice day(calm)<|im_end|>\n",
            "<|im_start|>assistant\n<think>\n",
        )
    )
    assert torch.equal(cloned["audio_input_ids"][0][cloned["input_ids"][0] == E].reshape(-1, 8), voice.T)


def test_dialogue_layouts_match_the_original_segments(proc_a):
    tok = proc_a.tokenizer
    E, S, P = proc_a.empty_token_id, proc_a.sosp_token_id, proc_a.eosp_token_id
    q1, q2, voice, answer = (torch.randint(0, 16, (8, n)) for n in (4, 8, 4, 8))
    conversation = [
        {"role": "user", "content": [{"type": "audio", "audio_codes": q1}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}, {"type": "audio", "audio_codes": answer}]},
        {"role": "user", "content": [{"type": "audio", "audio_codes": q2}]},
    ]
    spoken = proc_a.spoken_dialogue(
        conversation, system_prompt="Be brief.", voice={"type": "audio", "audio_codes": voice}
    )
    hi = _tokens(tok, "Hi!") + [proc_a.eot_token_id]
    assert len(hi) <= 5
    expected = (
        _tokens(tok, "<|im_start|>system\n", "Your voice should be:")
        + [S, E, P]
        + _tokens(tok, "<|im_end|>\n", "<|im_start|>user\n", "Be brief.", "\n\n")
        + [S, E, P]
        + _tokens(tok, "<|im_end|>\n", "<|im_start|>assistant\n")
        + [proc_a.sostm_token_id]
        + hi
        + [E, E, proc_a.eostm_token_id]
        + _tokens(tok, "<|im_end|>\n", "<|im_start|>user\n")
        + [S, E, E, P]
        + _tokens(tok, "<|im_end|>\n", "<|im_start|>assistant\n<|sostm|>")
    )
    assert spoken["input_ids"][0].tolist() == expected
    # speech-to-text dialogue: text answers in the history, thinking off / on
    s2t = [conversation[0], {"role": "assistant", "content": "Hi!"}, conversation[2]]
    closed = proc_a.spoken_dialogue(s2t, output_modality="text")
    history = (
        _tokens(tok, "<|im_start|>user\n")
        + [S, E, P]
        + _tokens(tok, "<|im_end|>\n", "<|im_start|>assistant\n", "Hi!", "<|im_end|>\n")
        + _tokens(tok, "<|im_start|>user\n")
        + [S, E, E, P]
        + _tokens(tok, "<|im_end|>\n")
    )
    assert closed["input_ids"][0].tolist() == history + _tokens(
        tok, "<|im_start|>assistant\n", "<think>\n\n</think>\n"
    )
    thinking = proc_a.apply_chat_template(s2t, thinking=True)
    assert thinking["input_ids"][0].tolist() == history + _tokens(tok, "<|im_start|>assistant\n", "<think>\n")
    # audio understanding with thinking
    understood = proc_a.audio_understanding(
        {"type": "audio", "audio_codes": q1}, "Summarize the audio.", thinking=True
    )
    assert understood["input_ids"][0].tolist() == (
        _tokens(tok, "<|im_start|>user\n")
        + [S, E, P]
        + _tokens(tok, "Summarize the audio.", "<|im_end|>\n", "<|im_start|>assistant\n", "<think>\n")
    )
    # text dialogue, multi-turn
    chat = proc_a.text_dialogue(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert chat["input_ids"][0].tolist() == _tokens(
        tok,
        "<|im_start|>user\n",
        "Hi",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        "Hello",
        "<|im_end|>\n",
        "<|im_start|>user\n",
        "Bye",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<think>\n\n</think>\n",
    )


def test_training_samples_open_the_answer_like_the_generation_prompt(proc_a):
    """An assistant message with `thinking` starts with the same tokens as the generation prompt, so a training
    sample is the inference prompt followed by the answer and `<|im_end|>\n`."""
    golden, manifest = _golden("lm_a")
    user = {
        "role": "user",
        "content": [_codes_item(golden, "asr", 8), {"type": "text", "text": manifest["asr_template"]}],
    }
    prompt = proc_a.apply_chat_template([user])
    sample = proc_a.apply_chat_template(
        [user, {"role": "assistant", "content": "Hello there", "thinking": ""}], add_generation_prompt=False
    )
    answer = _tokens(proc_a.tokenizer, "Hello there", "<|im_end|>\n")
    assert sample["input_ids"][0].tolist() == prompt["input_ids"][0].tolist() + answer
    assert torch.equal(sample["audio_input_ids"][0, : prompt["input_ids"].shape[1]], prompt["audio_input_ids"][0])
    reasoned = proc_a.apply_chat_template(
        [user, {"role": "assistant", "content": "Hello there", "thinking": "It is a greeting.\n"}],
        add_generation_prompt=False,
    )
    opened = proc_a.apply_chat_template([user], thinking=True)
    assert reasoned["input_ids"][0].tolist() == opened["input_ids"][0].tolist() + _tokens(
        proc_a.tokenizer, "It is a greeting.\n", "</think>\n", "Hello there", "<|im_end|>\n"
    )
    with pytest.raises(ValueError, match="only goes in assistant messages"):
        proc_a.apply_chat_template([{"role": "user", "content": "hi", "thinking": ""}])


def test_speech_continuation_leaves_the_segment_open(proc_a):
    codes = torch.randint(0, 16, (8, 6))
    batch = proc_a.speech_continuation({"type": "audio", "audio_codes": codes})
    E = proc_a.empty_token_id
    assert batch["input_ids"][0].tolist() == [proc_a.sosp_token_id, E, E]
    assert torch.equal(batch["audio_input_ids"][0, 1:].reshape(-1, 8)[:6], codes.T)


# ------------------------------------------------------------------------------------------------ batching


def test_batch_is_left_padded_and_each_row_equals_the_sample_alone(proc_a):
    golden, manifest = _golden("lm_a")
    text_conv = [{"role": "user", "content": "What is the weather like in Beijing?"}]
    asr_conv = [
        {
            "role": "user",
            "content": [_codes_item(golden, "asr", 8), {"type": "text", "text": manifest["asr_template"]}],
        }
    ]
    batch = proc_a.apply_chat_template([text_conv, asr_conv])
    alone = [proc_a.apply_chat_template(text_conv), proc_a.apply_chat_template(asr_conv)]
    assert batch["input_ids"].shape == (2, 50) and batch["audio_input_ids"].shape == (2, 50, 4, 8)
    assert batch["input_ids"].dtype == batch["audio_input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    pad = 50 - 37
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * 37 and batch["attention_mask"][1].eq(1).all()
    assert (batch["input_ids"][0, :pad] == proc_a.tokenizer.pad_token_id).all()
    assert (batch["audio_input_ids"][0, :pad] == torch.tensor(proc_a.audio_empty_ids)).all()
    for row, single in enumerate(alone):
        length = single["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, -length:], single["input_ids"][0])
        assert torch.equal(batch["audio_input_ids"][row, -length:], single["audio_input_ids"][0])
    helper_batch = proc_a.tts(["one", "two words here"])
    assert helper_batch["input_ids"].shape[0] == 2
    assert helper_batch["attention_mask"][0].sum() < helper_batch["attention_mask"][1].sum()
    chats = proc_a.text_dialogue(["Hi", "What is the weather like in Beijing?"])
    assert torch.equal(chats["input_ids"][1], alone[0]["input_ids"][0])
    assert torch.equal(
        chats["input_ids"][0, -chats["attention_mask"][0].sum() :], proc_a.text_dialogue("Hi")["input_ids"][0]
    )
    spoken = [
        [{"role": "user", "content": [_codes_item(golden, "asr", 8)]}],
        [{"role": "user", "content": [_codes_item(golden, "icl_in", 8)]}],
    ]
    dialogues = proc_a.spoken_dialogue(spoken, system_prompt="Be brief.")
    for row, conv in enumerate(spoken):
        single = proc_a.spoken_dialogue(conv, system_prompt="Be brief.")
        length = single["input_ids"].shape[1]
        assert torch.equal(dialogues["input_ids"][row, -length:], single["input_ids"][0])
        assert torch.equal(dialogues["audio_input_ids"][row, -length:], single["audio_input_ids"][0])


# ------------------------------------------------------------------------------------------------ special tokens, save/load


def test_special_token_ids_and_missing_tokens_are_added():
    _, manifest = _golden("lm_a")
    processor = _processor("lm_a", with_codec=False)
    ids = manifest["special_token_ids"]
    for name, token in {**processing.SPECIAL_TOKENS, **processing.CHAT_TOKENS}.items():
        assert getattr(processor, f"{name}_id") == ids[token]
    # The golden tokenizer without MiMo-Audio's tokens (only <|endoftext|>, <|im_start|>, <|im_end|> = 400..402).
    spec = json.loads((GOLDEN / "lm_a" / "checkpoint" / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] <= 402]
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    assert "<|sosp|>" not in bare.get_vocab() and len(bare) == 403
    processor = MiMoAudioProcessor(MiMoAudioFeatureExtractor(n_mels=32), bare, audio_empty_ids=[64, 64] + [16] * 6)
    added = [getattr(processor, f"{name}_id") for name in processing.SPECIAL_TOKENS]
    assert sorted(added) == list(range(403, 411))
    for name, token in processing.SPECIAL_TOKENS.items():
        assert bare(token, add_special_tokens=False)["input_ids"] == [getattr(processor, f"{name}_id")]


def test_generation_kwargs_per_task(proc_a, model_a):
    """The original's per-task stoppers (`MimoAudio.*_sft`, `in_context_learning_s2s`) and samplers
    (`task_sampler_configs`), by token name; greedy tasks give the greedy tokens with sampling checkpoint defaults."""
    processor = proc_a
    vocab = processor.tokenizer.get_vocab()
    eot, im_end, eostm, eosp = (vocab[t] for t in ("<|endoftext|>", "<|im_end|>", "<|eostm|>", "<|eosp|>"))
    audio = {"audio_do_sample": True, "audio_temperature": 0.9, "audio_top_k": 0, "audio_top_p": 0.95}
    expected = {
        "asr": ([eot, im_end], {"do_sample": False}),
        "audio_understanding": ([eot, im_end], {"do_sample": True, "temperature": 0.3, "top_k": 0, "top_p": 0.95}),
        "text_dialogue": ([eot, im_end], {"do_sample": True, "temperature": 0.4, "top_k": 0, "top_p": 0.95}),
        "speech_to_text_dialogue": ([eot, im_end], {"do_sample": True, "temperature": 0.6, "top_k": 0, "top_p": 0.95}),
        "tts": ([eot, eostm, im_end], {"do_sample": True, "temperature": 0.6, "top_k": 0, "top_p": 1.0}),
        "spoken_dialogue": ([eot, eostm, im_end], {"do_sample": True, "temperature": 0.6, "top_k": 0, "top_p": 0.95}),
        "in_context_learning": ([eot, eostm], {"do_sample": False}),
        "speech_continuation": ([eot, eosp], {"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.95}),
    }
    for task, (stops, text) in expected.items():
        kwargs = processor.generation_kwargs(task)
        task_audio = {**audio, "audio_top_k": 50} if task == "speech_continuation" else audio
        assert kwargs == {"eos_token_id": stops, **text, **task_audio}, task
    with pytest.raises(ValueError, match="Unknown task 'chat'.*'asr'"):
        processor.generation_kwargs("chat")

    # On a checkpoint whose stored defaults sample (as converted ones do), the ASR kwargs decode the text greedily.
    model = model_a.eval()
    inputs = processor.asr(_codes_item(_golden("lm_a")[0], "asr", 8))
    sampling = {"do_sample": True, "temperature": 5.0, "top_k": 0, "top_p": 1.0, "eos_token_id": None}
    greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False, audio_do_sample=False, eos_token_id=None)
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=5, **sampling)
    asr = {**processor.generation_kwargs("asr"), "eos_token_id": None, "audio_do_sample": False}
    stored = copy.deepcopy(model.generation_config)
    model.generation_config.update(**sampling)
    try:
        torch.manual_seed(0)
        task = model.generate(**inputs, max_new_tokens=5, **asr)
    finally:
        model.generation_config = stored
    assert torch.equal(task.sequences, greedy.sequences) and not torch.equal(sampled.sequences, greedy.sequences)


def test_save_and_load_round_trip_with_codec(proc_a, tmp_path):
    proc_a.save_pretrained(tmp_path)
    assert (tmp_path / "audio_tokenizer" / "config.json").is_file()
    assert (tmp_path / "audio_tokenizer" / "model.safetensors").is_file()
    assert "audio_tokenizer" not in json.loads((tmp_path / "processor_config.json").read_text())
    loaded = MiMoAudioProcessor.from_pretrained(tmp_path)
    auto = AutoProcessor.from_pretrained(tmp_path)
    assert type(auto) is MiMoAudioProcessor
    for other in (loaded, auto):
        assert (other.group_size, other.audio_channels, other.audio_empty_ids) == (4, 8, [64, 64] + [16] * 6)
        assert other.feature_extractor.to_dict() == proc_a.feature_extractor.to_dict()
        assert other.tokenizer.get_vocab() == proc_a.tokenizer.get_vocab()
        assert other.empty_token_id == proc_a.empty_token_id
        state, reference = other.audio_tokenizer.state_dict(), proc_a.audio_tokenizer.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    conversation = [{"role": "user", "content": [{"type": "audio", "path": str(AUDIO / "prompt_speech_en_w.wav")}]}]
    before, after = proc_a.apply_chat_template(conversation), loaded.apply_chat_template(conversation)
    assert all(torch.equal(before[key], after[key]) for key in before)
    bf16 = MiMoAudioProcessor.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert bf16.audio_tokenizer.dtype == torch.bfloat16 and bf16.audio_tokenizer.device.type == "cpu"


def test_save_and_load_without_codec(tmp_path):
    processor = _processor("lm_b", with_codec=False)
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "audio_tokenizer").exists()
    loaded = MiMoAudioProcessor.from_pretrained(tmp_path)
    assert loaded.audio_tokenizer is None
    assert loaded.audio_empty_ids == [32, 32] + [8] * 6


def test_from_original_and_converted_checkpoints(proc_a, model_a, tmp_path):
    """Without a processor_config.json the settings come from the model checkpoint: from the original directories
    (LM + codec), and through AutoProcessor / AutoModel from a converted checkpoint, end to end."""
    from transformers import AutoModel

    from transformers_mimo.convert_mimo_audio_to_hf import convert

    golden, manifest = _golden("lm_a")
    original = MiMoAudioProcessor.from_pretrained(
        GOLDEN / "lm_a" / "checkpoint", audio_tokenizer=GOLDEN / "tok_a" / "checkpoint"
    )
    assert (original.group_size, original.audio_channels, original.audio_empty_ids) == (4, 8, [64, 64] + [16] * 6)
    assert original.feature_extractor.to_dict() == proc_a.feature_extractor.to_dict()
    assert torch.equal(_original_grid(original.asr(_codes_item(golden, "asr", 8)), 4), golden["asr.input_ids_grid"])

    convert(GOLDEN / "lm_a" / "checkpoint", tmp_path, tokenizer_dir=GOLDEN / "tok_a" / "checkpoint")
    processor, model = AutoProcessor.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)
    assert type(processor) is MiMoAudioProcessor and processor.audio_empty_ids == proc_a.audio_empty_ids
    conversation = [{"role": "user", "content": [{"type": "audio", "path": str(AUDIO / "weather_today_zh.mp3")}]}]
    inputs = processor.apply_chat_template(conversation, output_modality="audio")
    reference_inputs = proc_a.apply_chat_template(conversation, output_modality="audio")
    assert all(torch.equal(inputs[key], reference_inputs[key]) for key in inputs)
    # greedy text and audio (the converted checkpoint carries the original's sampling defaults)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "audio_do_sample": False, "eos_token_id": None}
    kwargs["return_dict_in_generate"] = True
    output = model.eval().generate(**inputs, **kwargs)
    reference = model_a.generate(**reference_inputs, **kwargs)
    assert torch.equal(output.sequences, reference.sequences)
    assert torch.equal(output.audio_sequences, reference.audio_sequences)
    length = inputs["input_ids"].shape[1]
    decoded, expected = (
        processor.batch_decode_generation(output, prompt_length=length),
        proc_a.batch_decode_generation(reference, prompt_length=length),
    )
    assert decoded.text == expected.text
    assert (decoded.audio[0] is None and expected.audio[0] is None) or torch.equal(decoded.audio[0], expected.audio[0])


# ------------------------------------------------------------------------------------------------ decoding


def _generate_like_output(processor, prompt_length=3):
    """Two samples as `generate` returns them (prompt included): sample 0 speaks (text chunk, patches, <|eot|>,
    patches, <|eostm|>, <|im_end|>, padding); sample 1 answers in text and stops with end-of-text."""
    tok = processor.tokenizer
    E = processor.empty_token_id
    empty = torch.tensor(processor.audio_empty_ids)
    hello, world = _tokens(tok, "Hello"), _tokens(tok, " world")
    speech0 = (
        hello + [E, E] + world + [processor.eot_token_id, E, E, E, processor.eostm_token_id, processor.im_end_token_id]
    )
    text1 = _tokens(tok, "Fine, thanks") + [tok.eos_token_id]
    length = prompt_length + max(len(speech0), len(text1)) + 2
    sequences = torch.full((2, length), tok.pad_token_id)
    sequences[:, :prompt_length] = torch.tensor(_tokens(tok, "<|im_start|>assistant\n"))[:prompt_length]
    sequences[0, prompt_length : prompt_length + len(speech0)] = torch.tensor(speech0)
    sequences[1, prompt_length : prompt_length + len(text1)] = torch.tensor(text1)
    audio = empty.expand(2, length, 4, 8).clone()
    generator = torch.Generator().manual_seed(0)
    speech_positions = (sequences[0] == E).nonzero()[:, 0]
    patches = torch.randint(0, 16, (len(speech_positions), 4, 8), generator=generator)
    audio[0, speech_positions] = patches
    audio[0, :prompt_length] = torch.randint(0, 16, (prompt_length, 4, 8), generator=generator)  # prompt: ignored
    return sequences, audio, patches


def test_batch_decode_text_and_speech(proc_a):
    sequences, audio, patches = _generate_like_output(proc_a)
    output = proc_a.batch_decode_generation(sequences, audio, prompt_length=3)
    assert output.text == ["Hello world", "Fine, thanks"]
    assert output.audio[1] is None and output.sampling_rate == 24000
    codes = patches.reshape(-1, 8).T  # 5 patches = 20 frames
    reference = proc_a.audio_tokenizer.decode(codes[None]).audio_values[0, 0]
    assert output.audio[0].shape == (5 * 4 * 960,)
    torch.testing.assert_close(output.audio[0], reference, rtol=0, atol=1e-6)
    raw = proc_a.batch_decode_generation(sequences, audio, prompt_length=3, decode_audio=False)
    assert raw.audio == [None, None]
    stream = torch.tensor([[proc_a.sostm_token_id] + _tokens(proc_a.tokenizer, "Hi") + [proc_a.eot_token_id]])
    assert proc_a.batch_decode_generation(stream).text == ["<|sostm|>Hi"]  # the original keeps <|sostm|>
    assert proc_a.batch_decode_generation(stream, skip_special_tokens=True).text == ["Hi"]
    text, waveform = proc_a.decode_generation(sequences[0], audio[0], prompt_length=3)
    assert text == "Hello world" and torch.equal(waveform, output.audio[0])


def test_batch_decode_accepts_generate_output_and_segments(proc_a, monkeypatch):
    sequences, audio, patches = _generate_like_output(proc_a)
    result = MiMoAudioGenerateOutput(sequences=sequences, audio_sequences=audio)
    whole = proc_a.batch_decode_generation(result, prompt_length=3)
    monkeypatch.setattr(modeling_mimo_audio_tokenizer, "DECODE_SEGMENT_FRAMES", 8)  # 20 frames -> segments of 8, 8, 4
    segmented = proc_a.batch_decode_generation(result, prompt_length=3)
    codes = patches.reshape(-1, 8).T
    pieces = [proc_a.audio_tokenizer.decode(codes[None, :, s : s + 8]).audio_values[0, 0] for s in (0, 8, 16)]
    torch.testing.assert_close(segmented.audio[0], torch.cat(pieces), rtol=0, atol=1e-6)
    assert segmented.audio[0].shape == whole.audio[0].shape
    assert not torch.allclose(segmented.audio[0], whole.audio[0])  # segment borders change the audio (GroupNorm)


def test_stream_audio_matches_the_codec_streaming_decode(proc_a):
    sequences, audio, patches = _generate_like_output(proc_a)
    steps = [(sequences[:, t], audio[:, t]) for t in range(3, sequences.shape[1])]
    chunks = list(proc_a.stream_audio(steps, chunk_frames=8, left_overlap=6, right_overlap=2))
    assert all(len(chunk) == 2 for chunk in chunks)
    assert all(chunk[1].numel() == 0 for chunk in chunks)  # sample 1 never speaks
    streamed = torch.cat([chunk[0] for chunk in chunks])
    codec, codes = proc_a.audio_tokenizer, patches.reshape(-1, 8).T
    # The same feeding by hand: patches arrive one per step; 8 frames = 2 patches per decode, then flush at <|eostm|>.
    cache, expected = None, []
    for start, last in ((0, False), (8, False), (16, True)):
        out = codec.streaming_decode(
            codes[None, :, start : start + 8], cache=cache, is_last_chunk=last, left_overlap=6, right_overlap=2
        )
        cache = out.cache
        expected.append(out.audio_values[0, 0, : out.audio_values_lengths[0]])
    assert streamed.shape == (20 * 960,)
    torch.testing.assert_close(streamed, torch.cat(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", LM_CASES)
def test_batch_decode_matches_the_original_forward_outputs(case):
    """The original's recorded generations (fp32 no-stop runs) decode to its recorded text and waveform. Its wrapper
    drops the last generated position (quirk 9), so that position is dropped here too; its text also runs past stop
    tokens that were not active, where ours ends at the first end-of-text / `<|im_end|>`."""
    golden, manifest = _golden(case)
    processor = _processor(case)
    group, channels = processor.group_size, processor.audio_channels
    for prompt in ("text", "asr", "icl"):
        grid = golden[f"fp32.{prompt}.gen_nostop.generated_grid"].long()
        sequences = grid[0, ::group][None]
        audio = grid[1:].T.reshape(-1, group, channels)[None]
        prompt_length = golden[f"{prompt}.input_ids_grid"].shape[1] // group
        output = processor.batch_decode_generation(sequences[:, :-1], audio[:, :-1], prompt_length=prompt_length)
        reference = manifest["info"]["fp32"]["prompts"][prompt]["gen_nostop"]
        original_text = re.split(
            r"<\|im_end\|>|<\|endoftext\|>", reference["detokenized_text_returned_by_MimoAudio.forward"]
        )[0]
        assert output.text == [original_text], prompt
        expected = golden[f"fp32.{prompt}.gen_nostop.e2e_wav"][0, 0]
        assert output.audio[0].shape == expected.shape == (reference["e2e_wav_samples"],)
        # same fp32 codec math; measured max difference 6e-8 on peaks ~0.1
        torch.testing.assert_close(output.audio[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prompt", ["asr", "icl"])
def test_end_to_end_processor_generate_decode(proc_a, model_a, prompt):
    """Prompt from the processor -> model.generate (the lm_a checkpoint, greedy, 12 positions, no stop) -> the
    original's recorded generation exactly -> batch_decode to the original's text."""
    golden, manifest = _golden("lm_a")
    model = model_a
    if prompt == "asr":
        inputs = proc_a.asr(_codes_item(golden, "asr", 8))
    else:
        example = {
            "input_audio": _codes_item(golden, "icl_in", 8),
            "output_audio": _codes_item(golden, "icl_out", 8),
            "output_text": "Hello, how are you today? I am fine.",
        }
        inputs = proc_a.in_context_learning(
            _codes_item(golden, "icl_query", 8), [example], "Speak in the same voice as the example."
        )
    output = model.eval().generate(
        **inputs, max_new_tokens=12, do_sample=False, eos_token_id=None, return_dict_in_generate=True
    )
    length = inputs["input_ids"].shape[1]
    key = f"fp32.{prompt}.gen_nostop"
    assert torch.equal(output.sequences[0, length:], golden[f"{key}.step_text_token"])
    assert torch.equal(output.audio_sequences[0, length:], golden[f"{key}.step_local_tokens"])
    decoded = proc_a.batch_decode_generation(output, prompt_length=length)
    reference = manifest["info"]["fp32"]["prompts"][prompt]["gen_nostop"]
    assert decoded.text == [reference["detokenized_text_returned_by_MimoAudio.forward"]]
    patches = golden[f"{key}.step_local_tokens"][golden[f"{key}.step_is_speech"].bool()]
    (expected,) = proc_a.decode_codes([patches.reshape(-1, 8).T])
    assert torch.equal(decoded.audio[0], expected)
    assert expected.shape == (patches.shape[0] * 4 * 960,)


def test_end_to_end_batch_with_audio_files(proc_a, model_a):
    """Two conversations (a spoken question from a file, a text question) in one left-padded batch through
    generate and batch_decode."""
    model = model_a
    spoken = [{"role": "user", "content": [{"type": "audio", "path": str(AUDIO / "weather_today_zh.mp3")}]}]
    written = [{"role": "user", "content": "What is the weather like in Beijing?"}]
    inputs = proc_a.apply_chat_template([spoken, written], output_modality="audio")
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1].all()  # the spoken prompt is shorter
    output = model.eval().generate(
        **inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, return_dict_in_generate=True
    )
    length = inputs["input_ids"].shape[1]
    assert output.sequences.shape == (2, length + 6) and output.audio_sequences.shape == (2, length + 6, 4, 8)
    decoded = proc_a.batch_decode_generation(output, prompt_length=length)
    stops = [proc_a.tokenizer.eos_token_id, proc_a.im_end_token_id]
    for row in range(2):
        generated = output.sequences[row, length:].tolist()
        end = min([generated.index(stop) for stop in stops if stop in generated], default=len(generated))
        text = proc_a.tokenizer.decode(generated[:end])
        assert (
            decoded.text[row] == text.replace("<|empty|>", "").replace("<|eot|>", "").replace("<|eostm|>", "").strip()
        )
        until = generated.index(proc_a.eostm_token_id) if proc_a.eostm_token_id in generated else len(generated)
        speech = generated[:until].count(proc_a.empty_token_id)
        assert (decoded.audio[row] is None) if speech == 0 else (decoded.audio[row].shape == (speech * 4 * 960,))


def test_stream_audio_from_a_generate_streamer(proc_a, model_a):
    """`generate` with a MiMoAudioStreamer in a thread -> stream_audio: the same chunks as streaming the finished
    output's steps, and as many samples as the generated speech frames."""
    golden, _ = _golden("lm_a")
    model = model_a
    inputs = proc_a.asr(_codes_item(golden, "asr", 8))
    kwargs = {**inputs, "max_new_tokens": 12, "do_sample": False, "eos_token_id": None}
    streamer = MiMoAudioStreamer()
    thread = Thread(target=model.eval().generate, kwargs={**kwargs, "streamer": streamer})
    thread.start()
    live = list(proc_a.stream_audio(streamer, chunk_frames=8, left_overlap=8, right_overlap=2))
    thread.join()
    output = model.generate(**kwargs, return_dict_in_generate=True)
    length = inputs["input_ids"].shape[1]
    steps = [(output.sequences[:, t], output.audio_sequences[:, t]) for t in range(length, output.sequences.shape[1])]
    replayed = list(proc_a.stream_audio(steps, chunk_frames=8, left_overlap=8, right_overlap=2))
    assert len(live) == len(replayed) > 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(live, replayed))
    speech_steps = int(golden["fp32.asr.gen_nostop.step_is_speech"].sum())
    assert sum(chunk[0].shape[0] for chunk in live) == speech_steps * 4 * 960


def test_other_group_size_and_channel_count():
    """Everything follows the configuration: group_size 3 and 3 codebooks with the tok_b codec."""
    golden = load_file(GOLDEN / "tok_b" / "golden.safetensors")
    codec = _codec("tok_b")
    processor = MiMoAudioProcessor(
        _feature_extractor(codec),
        AutoTokenizer.from_pretrained(GOLDEN / "lm_b" / "checkpoint"),
        audio_tokenizer=codec,
        group_size=3,
        audio_channels=3,
        audio_empty_ids=[32, 32, 8],
    )
    codes = golden["fp32.codes_single_segment"][:3]  # (3, 76): 76 frames -> 26 patches, last frame repeated twice
    (patches,) = processor.encode_audio(golden["wav"])
    assert patches.shape == (26, 3, 3)
    frames = patches.reshape(-1, 3)
    assert torch.equal(frames[:76], codes.T) and torch.equal(frames[76:], codes[:, -1:].T.expand(2, -1))

    conversation = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "ok"}, {"type": "audio", "audio_codes": codes[:, :9]}],
        },
    ]
    batch = processor.apply_chat_template(conversation, output_modality="audio")
    assert batch["audio_input_ids"].shape[2:] == (3, 3)
    speech = batch["input_ids"][0] == processor.empty_token_id
    assert speech.sum() == 3 and torch.equal(batch["audio_input_ids"][0][speech].reshape(-1, 3), codes[:, :9].T)
    assert (batch["audio_input_ids"][0][~speech] == torch.tensor([32, 32, 8])).all()

    E = processor.empty_token_id
    sequences = torch.tensor([[E, E, processor.eostm_token_id]])
    audio = torch.tensor([32, 32, 8]).expand(1, 3, 3, 3).clone()
    audio[0, :2] = codes[:, :6].T.reshape(2, 3, 3)
    decoded = processor.batch_decode_generation(sequences, audio)
    reference = codec.decode(codes[None, :, :6]).audio_values[0, 0]
    assert decoded.text == [""] and decoded.audio[0].shape == (6 * 960,)
    torch.testing.assert_close(decoded.audio[0], reference, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([{"role": "robot", "content": "hi"}], "unknown role"),
        ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "unknown content type"),
        ([{"role": "user"}], "must be a dict with `role` and `content`"),
        (["hello"], "must be a dict with `role` and `content`"),
        ([{"role": "user", "content": 3}], "`content` must be a string or a non-empty list"),
        ([{"role": "user", "content": []}], "`content` must be a string or a non-empty list"),
        ([{"role": "user", "content": [{"type": "text"}]}], "a text item must be"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "needs exactly one of"),
        (
            [{"role": "user", "content": [{"type": "audio", "path": "a.wav", "audio_codes": [[1]]}]}],
            "needs exactly one of",
        ),
        ([{"role": "user", "content": "hi", "name": "bob"}], "unknown message keys"),
        ([], "non-empty list"),
        (
            [
                {
                    "role": "assistant",
                    "content": [{"type": "audio", "audio_codes": torch.zeros(8, 4, dtype=torch.long)}],
                }
            ],
            "one non-empty text item",
        ),
        ([{"role": "user", "content": [{"type": "audio", "path": "/nonexistent/clip.wav"}]}], "no audio file"),
        ([{"role": "user", "content": [{"type": "audio", "audio": np.zeros(0, dtype=np.float32)}]}], "empty"),
        ([{"role": "user", "content": [{"type": "audio", "audio_codes": torch.full((8, 4), 64)}]}], "codebook size"),
        (
            [{"role": "user", "content": [{"type": "audio", "audio_codes": torch.zeros(4, 4, dtype=torch.long)}]}],
            "shape",
        ),
    ],
)
def test_bad_conversations_raise_value_error(proc_a, conversation, message):
    with pytest.raises(ValueError, match=message):
        proc_a.apply_chat_template(conversation)


def test_bad_audio_and_options_raise_value_error(proc_a, tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(ValueError, match="cannot decode"):
        proc_a.asr(str(garbage))
    silent = tmp_path / "empty.wav"
    sf.write(silent, np.zeros(0, dtype=np.float32), 24000)
    with pytest.raises(ValueError, match="empty"):
        proc_a.asr(str(silent))
    with pytest.raises(ValueError, match="output_modality"):
        proc_a.apply_chat_template([{"role": "user", "content": "hi"}], output_modality="video")
    with pytest.raises(ValueError, match="tensors"):
        proc_a.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with pytest.raises(ValueError, match="Unexpected"):
        proc_a.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="x")
    with pytest.raises(ValueError, match="natural_instruction"):
        proc_a.tts("hi", style="calm", natural_instruction=True)
    with pytest.raises(ValueError, match="output_text"):
        proc_a.in_context_learning(str(garbage), [{"input_audio": "a", "output_audio": "b", "output_text": ""}], "x")
    without_codec = _processor("lm_a", with_codec=False)
    with pytest.raises(ValueError, match="audio_tokenizer"):
        without_codec.asr(str(AUDIO / "prompt_speech_en_w.wav"))
    with pytest.raises(ValueError, match="prompt_length"):
        proc_a.batch_decode_generation(torch.zeros(1, 4, dtype=torch.long), prompt_length=5)
    with pytest.raises(ValueError, match="audio_sequences"):
        proc_a.batch_decode_generation(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, 4, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="No audio"):
        proc_a.save_audio(None, tmp_path / "x.wav")
