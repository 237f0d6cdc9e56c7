"""Tests of the MiMo-Audio tokenizer (codec) against the goldens recorded from the original code.

Tolerances (fp32, CPU; the goldens' own 1-vs-2-thread noise for the tokenizer is 0):
  * codes: exactly equal.
  * waveforms (peak ~0.14): <= 1e-6 abs (observed <= 1e-7).
  * pre-quantization encoder states (values up to ~6): <= 2e-5 abs (observed <= 4.6e-6); RVQ-decoded states and
    the RVQ decode of given codes: <= 1e-6 (observed 0).
  * a batch item against the same item alone: codes equal, floats <= 1e-5 (observed <= 1e-7).
bf16 (`dtype=torch.bfloat16`) against the original's bf16 goldens. Ours runs the RVQ in float32 with the
codebooks as stored in the model (bf16-rounded, like the original), but computes rotary frequencies, GroupNorm
statistics and the ISTFT (window included) in float32, where the original rounds inv_freq and the window to bf16
(quirk T5); its attention ran in float32 math, ours in bf16. The gaps are of the size of bf16-vs-fp32 itself:
  * codes >= 90 % equal overall and >= 95 % for the first quantizer (observed 94-97 % and 99-100 %);
  * pre-quantization states <= 0.1 abs (1-2 bf16 ulps at magnitude 4-8; observed 0.047-0.063);
  * RVQ decode of given codes: exact;
  * waveforms <= 4e-3 abs, about 3 % of the peak (observed 1.4e-3-1.8e-3), streaming pieces included;
  * a streamed batch item against the same stream alone: <= 2e-3 (observed 1.1e-3; bf16 kernels round differently
    for other batch shapes).
"""

import json
import shutil
from functools import lru_cache

import pytest
import torch
from conftest import GOLDEN
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForAudioTokenization
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import transformers_mimo  # noqa: F401  (registers the Auto classes)
from transformers_mimo import (
    MiMoAudioTokenizerConfig,
    MiMoAudioTokenizerModel,
    MiMoAudioTokenizerStreamingCache,
    convert_original_state_dict,
    modeling_mimo_audio_tokenizer,
)
from transformers_mimo.modeling_mimo_audio_tokenizer import (
    MiMoAudioTokenizerAttention,
    MiMoAudioTokenizerISTFTHead,
    MiMoAudioTokenizerRotaryEmbedding,
)


CASES = ["tok_a", "tok_b"]
WAV_ATOL = 1e-6
BF16_WAV_ATOL = 4e-3


@lru_cache
def golden(case):
    return load_file(GOLDEN / case / "golden.safetensors")


@lru_cache
def manifest(case):
    return json.loads((GOLDEN / case / "manifest.json").read_text())


@lru_cache
def model(case, dtype=torch.float32, attn_implementation="sdpa"):
    return MiMoAudioTokenizerModel.from_pretrained(
        GOLDEN / case / "checkpoint", dtype=dtype, attn_implementation=attn_implementation
    )


def mel(case):
    return golden(case)["mel"][None]  # (1, n_mels, frames)


def valid_audio(output, index=0):
    return output.audio_values[index, :, : output.audio_values_lengths[index]]


def right_pad(tensors, value=0):
    """Stacks `(..., length_i)` tensors right-padded with `value`, plus the `(batch, max_length)` 0/1 mask."""
    longest = max(t.shape[-1] for t in tensors)
    padded = torch.stack([torch.nn.functional.pad(t, (0, longest - t.shape[-1]), value=value) for t in tensors])
    mask = torch.stack([(torch.arange(longest) < t.shape[-1]).long() for t in tensors])
    return padded, mask


# ----------------------------------------------------------------------------------------------- configuration


def test_config_reads_original_config_json_with_and_without_model_type(tmp_path):
    original = json.loads((GOLDEN / "tok_b" / "checkpoint" / "config.json").read_text())
    config = MiMoAudioTokenizerConfig.from_pretrained(GOLDEN / "tok_b" / "checkpoint")
    assert config.model_type == "mimo_audio_tokenizer"
    assert config.encoder_attn_window_size == [16, 16]
    assert config.decoder_attn_window_size == [24, -1]
    assert config.vocoder_attn_window_size == [20, 5]
    assert config.codebook_size == [32, 32, 8, 8, 8, 8, 8, 8, 8, 8]
    assert (config.d_model, config.n_mels, config.num_quantizers, config.nfft) == (48, 24, 10, 960)
    assert config.samples_per_code == 960 and config.frame_rate == 25

    # Real checkpoints have no model_type / architectures.
    del original["model_type"], original["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(original))
    shutil.copy(GOLDEN / "tok_b" / "checkpoint" / "model.safetensors", tmp_path)
    config = MiMoAudioTokenizerConfig.from_pretrained(tmp_path)
    assert config.encoder_attn_window_size == [16, 16] and config.num_quantizers == 10
    loaded = MiMoAudioTokenizerModel.from_pretrained(tmp_path)
    codes = loaded.encode(mel("tok_b")).audio_codes[0]
    assert torch.equal(codes, golden("tok_b")["fp32.codes_single_segment"])


def test_config_codebook_size_list_is_extended_without_mutating_the_argument():
    sizes = [8, 4]
    config = MiMoAudioTokenizerConfig(num_quantizers=4, codebook_size=sizes)
    assert config.codebook_size == [8, 4, 4, 4]
    assert sizes == [8, 4]  # original quirk T6 mutated the caller's list
    assert MiMoAudioTokenizerConfig(num_quantizers=3, codebook_size=16).codebook_size == [16, 16, 16]
    assert MiMoAudioTokenizerConfig().codebook_size == [1024, 1024] + [128] * 18


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"encoder_attn_window_size": [4, 4, 4]}, "encoder_attn_window_size"),
        ({"vocoder_attn_window_size": [-2, 3]}, "vocoder_attn_window_size"),
        ({"d_model": 60, "encoder_attention_heads": 7}, "heads"),
        ({"streaming_left_overlap": 10, "streaming_right_overlap": 20}, "streaming"),
        ({"vocoder_padding": "valid"}, "vocoder_padding"),
        ({"ln_type": "BatchNorm"}, "ln_type"),
        ({"encoder_skip_layer_id": 40}, "encoder_skip_layer_id"),
    ],
)
def test_config_rejects_inconsistent_values(kwargs, message):
    # Transformers' strict configs wrap the ValueError of `validate_architecture` in this error.
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        MiMoAudioTokenizerConfig(**kwargs)


# ------------------------------------------------------------------------------------------- fp32 vs goldens


@pytest.mark.parametrize("case", CASES)
def test_encode_matches_original_single_segment(case):
    g = golden(case)
    output = model(case).encode(mel(case))
    expected_codes = g["fp32.codes_single_segment"]
    assert output.audio_codes.shape == (1, *expected_codes.shape)
    assert output.audio_codes.dtype == torch.long
    assert torch.equal(output.audio_codes[0], expected_codes)
    assert torch.equal(output.audio_codes_mask, torch.ones(1, expected_codes.shape[1], dtype=torch.long))
    assert output.audio_codes_mask.sum(-1).tolist() == g["fp32.encode_output_length"].tolist()
    torch.testing.assert_close(
        output.unquantized_hidden_states, g["fp32.encoder_hidden_states_unquantized"], atol=2e-5, rtol=0
    )
    torch.testing.assert_close(output.quantized_hidden_states, g["fp32.encode_hidden_states"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_encode_with_fewer_quantizers_keeps_the_first_codes(case):
    tokenizer = model(case)
    full = golden(case)["fp32.codes_single_segment"]
    output = tokenizer.encode(mel(case), num_quantizers=3)
    assert torch.equal(output.audio_codes[0], full[:3])
    expected = tokenizer.quantizer.decode(full[:3])
    torch.testing.assert_close(output.quantized_hidden_states[0], expected, atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_encode_long_input_in_segments_matches_each_segment_alone(case):
    """The original cuts long inputs into 6000-frame segments; the goldens used small segments. Policy: each segment
    as if alone (`*_each_alone`), not the original's padded batch (quirk T1, `codes_multi_segment`)."""
    g, info = golden(case), manifest(case)["tensors"]["fp32.codes_multi_segment"]
    segment_lengths = info["input_lens"]
    tokenizer = MiMoAudioTokenizerModel.from_pretrained(
        GOLDEN / case / "checkpoint", segment_length=segment_lengths[0]
    )
    output = tokenizer.encode(mel(case))
    assert torch.equal(output.audio_codes[0], g["fp32.codes_multi_segment_each_alone"])
    assert int(output.audio_codes_mask.sum()) == int(g["fp32.codes_multi_segment_output_lengths"].sum())
    # The original's batched quirk really differs here, so this test tells the two apart.
    assert not torch.equal(g["fp32.codes_multi_segment"], g["fp32.codes_multi_segment_each_alone"])
    # bf16: >= 85 % of the codes equal (observed 90-96 %; the original's own bf16 and fp32 codes agree 91-94 % here,
    # deeper quantizers diverging most) and >= 95 % of the first quantizer's (observed 97 %).
    bf16 = MiMoAudioTokenizerModel.from_pretrained(
        GOLDEN / case / "checkpoint", segment_length=segment_lengths[0], dtype=torch.bfloat16
    )
    codes, expected = bf16.encode(mel(case)).audio_codes[0], g["bf16.codes_multi_segment_each_alone"]
    assert (codes == expected).float().mean() >= 0.85 and (codes[0] == expected[0]).float().mean() >= 0.95


@pytest.mark.parametrize("case", CASES)
def test_rvq_decode_matches_original(case):
    g = golden(case)
    decoded = model(case).quantizer.decode(g["fp32.codes_single_segment"])
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, g["fp32.decode_vq_all"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "codes_name, quantizers, name",
    [
        ("codes_single_segment", 8, "decode_wav_q8"),
        ("codes_single_segment", None, "decode_wav_all_q"),
        ("codes_multi_segment", 8, "decode_wav_q8_multi_segment_codes"),
    ],
)
def test_decode_matches_original(case, codes_name, quantizers, name):
    g = golden(case)
    codes = g[f"fp32.{codes_name}"][None, :quantizers]
    output = model(case).decode(codes)
    expected = g[f"fp32.{name}"]
    assert output.audio_values.shape == expected.shape == (1, 1, codes.shape[-1] * 960)
    assert output.audio_values.dtype == torch.float32
    assert output.audio_values_lengths.tolist() == [codes.shape[-1] * 960]
    torch.testing.assert_close(output.audio_values, expected, atol=WAV_ATOL, rtol=0)


def test_forward_reconstructs_like_encode_then_decode():
    tokenizer, g = model("tok_a"), golden("tok_a")
    output = tokenizer(mel("tok_a"), num_quantizers=8)
    assert torch.equal(output.audio_codes[0], g["fp32.codes_single_segment"][:8])
    torch.testing.assert_close(output.audio_values, g["fp32.decode_wav_q8"], atol=WAV_ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_eager_and_sdpa_agree(case, monkeypatch):
    """Goldens through eager attention, then a padded batch eager vs sdpa (<= 1e-5), with query blocks of 16 so
    the full attention of tok_a runs over several blocks."""
    monkeypatch.setattr(MiMoAudioTokenizerAttention, "query_block_size", 16)
    g = golden(case)
    eager = model(case, attn_implementation="eager")
    assert torch.equal(eager.encode(mel(case)).audio_codes[0], g["fp32.codes_single_segment"])
    wav = eager.decode(g["fp32.codes_single_segment"][None, :8]).audio_values
    torch.testing.assert_close(wav, g["fp32.decode_wav_q8"], atol=WAV_ATOL, rtol=0)

    codes = g["fp32.codes_single_segment"][:8]
    batch, mask = right_pad([codes, codes[:, 3:40]])
    expected = model(case).decode(batch, mask)
    output = eager.decode(batch, mask)
    assert torch.equal(output.audio_values_lengths, expected.audio_values_lengths)
    torch.testing.assert_close(output.audio_values, expected.audio_values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_eager_and_sdpa_encode_a_padded_batch_alike(case):
    """Padded encoder input (masked blocks on both paths): the same codes, encoder states within 1e-5."""
    full = mel(case)[0]
    batch, mask = right_pad([full, full[:, : full.shape[-1] // 2 + 3]])
    expected = model(case).encode(batch, mask)
    output = model(case, attn_implementation="eager").encode(batch, mask)
    assert torch.equal(output.audio_codes_mask, expected.audio_codes_mask)
    assert torch.equal(output.audio_codes, expected.audio_codes)
    torch.testing.assert_close(output.unquantized_hidden_states, expected.unquantized_hidden_states, atol=1e-5, rtol=0)


def test_attention_runs_through_the_attention_interface(monkeypatch):
    """`attn_implementation` picks the function from Transformers' `ALL_ATTENTION_FUNCTIONS`, as for any model."""
    calls = []

    def counting_sdpa(sdpa):
        def attention(module, *args, **kwargs):
            calls.append(type(module).__name__)
            return sdpa(module, *args, **kwargs)

        return attention

    patch_attention_function(monkeypatch, "sdpa", counting_sdpa)
    tokenizer, g = model("tok_a"), golden("tok_a")
    assert tokenizer.config._attn_implementation == "sdpa"
    codes = tokenizer.encode(mel("tok_a")).audio_codes[0]
    assert torch.equal(codes, g["fp32.codes_single_segment"])
    layers = tokenizer.config.encoder_layers
    assert calls and set(calls) == {"MiMoAudioTokenizerAttention"} and len(calls) % layers == 0


def test_unsupported_attention_implementation_is_rejected():
    with pytest.raises(ValueError, match="flex"):
        MiMoAudioTokenizerModel.from_pretrained(GOLDEN / "tok_a" / "checkpoint", attn_implementation="flex_attention")


# ------------------------------------------------------------------------------------------ batch invariance


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("segment_length", [6000, 64])
def test_encode_batch_items_equal_items_alone(case, segment_length):
    """Different lengths (odd ones hit the original's quirk T1) and garbage (NaN) in the padding."""
    tokenizer = MiMoAudioTokenizerModel.from_pretrained(GOLDEN / case / "checkpoint", segment_length=segment_length)
    full = mel(case)[0]
    items = [full[:, :97], full, full[:, :150]]
    features, mask = right_pad(items, value=float("nan"))
    batched = tokenizer.encode(features, mask)
    for index, item in enumerate(items):
        alone = tokenizer.encode(item[None])
        length = alone.audio_codes.shape[-1]
        assert batched.audio_codes_mask[index].sum() == length
        assert torch.equal(batched.audio_codes[index, :, :length], alone.audio_codes[0])
        assert (batched.audio_codes[index, :, length:] == 0).all()
        for name in ("unquantized_hidden_states", "quantized_hidden_states"):
            states = getattr(batched, name)
            torch.testing.assert_close(states[index, :length], getattr(alone, name)[0], atol=1e-5, rtol=0)
            assert (states[index, length:] == 0).all()


@pytest.mark.parametrize("case", CASES)
def test_decode_batch_items_equal_items_alone(case):
    """GroupNorm statistics use each item's own frames (the original's quirk T2 used the padded batch)."""
    tokenizer = model(case)
    codes = golden(case)["fp32.codes_single_segment"][:8]
    items = [codes[:, :17], codes, codes[:, 5:45]]
    batch, mask = right_pad(items, value=10**6)  # padded codes are ignored, even out of range
    batched = tokenizer.decode(batch, mask)
    assert batched.audio_values_lengths.tolist() == [17 * 960, codes.shape[-1] * 960, 40 * 960]
    for index, item in enumerate(items):
        alone = tokenizer.decode(item[None])
        torch.testing.assert_close(valid_audio(batched, index), valid_audio(alone), atol=1e-5, rtol=0)
        assert (batched.audio_values[index, :, batched.audio_values_lengths[index] :] == 0).all()
    torch.testing.assert_close(valid_audio(batched, 1), golden(case)["fp32.decode_wav_q8"][0], atol=WAV_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------- streaming


# dtype -> (torch dtype, tolerance against the golden, tolerance between a batch item and that item alone). In bf16 the
# matrix kernels round differently for other batch shapes, so batch and single agree to bf16 noise (measured 1.1e-3).
STREAM_DTYPES = {"fp32": (torch.float32, WAV_ATOL, 1e-5), "bf16": (torch.bfloat16, BF16_WAV_ATOL, 2e-3)}


@pytest.mark.parametrize("dtype", STREAM_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_streaming_single_stream_matches_original(case, dtype):
    """Default overlaps (left 250, right 40); the first chunk is held back (the original returned None)."""
    torch_dtype, atol, _ = STREAM_DTYPES[dtype]
    tokenizer, g = model(case, dtype=torch_dtype), golden(case)
    calls = manifest(case)["info"][dtype]["stream1"]["calls"]
    codes = g[f"{dtype}.codes_single_segment"][:8]
    cache, start, pieces = None, 0, []
    for call in calls:
        (length,) = call["chunk_input_lengths"]
        chunk = codes[None, :, start : start + length]
        output = tokenizer.streaming_decode(chunk, cache=cache, is_last_chunk=call["last_chunk"])
        start += length
        assert isinstance(output.cache, MiMoAudioTokenizerStreamingCache)
        assert output.cache.processed_lengths == call["processed_lengths_after"]
        assert [kept.shape[-1] for kept in output.cache.audio_codes] == call["cache_hidden_lengths_after"]
        cache = output.cache
        if call["returned_none"][0]:
            assert output.audio_values_lengths.tolist() == [0]
            continue
        expected = g[f"{dtype}.stream1.call{call['call']}.wav0"].float()
        torch.testing.assert_close(valid_audio(output), expected, atol=atol, rtol=0)
        pieces.append(valid_audio(output))
    # The pieces cover the whole utterance once.
    assert torch.cat(pieces, dim=-1).shape[-1] == codes.shape[-1] * 960


@pytest.mark.parametrize("dtype", STREAM_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_streaming_two_streams(case, dtype):
    """Each stream equals that stream streamed alone. The original's batched goldens are compared exactly where they
    do not depend on the batch: the stream whose input is the longest of its call (quirks T2/T3 touch the others)."""
    torch_dtype, atol, batch_atol = STREAM_DTYPES[dtype]
    tokenizer, g = model(case, dtype=torch_dtype), golden(case)
    info = manifest(case)["info"][dtype]["stream2"]
    overlaps = {name: info["streaming_config"][name] for name in ("left_overlap", "right_overlap")}
    streams = [g[f"{dtype}.stream2.codes_stream0"], g[f"{dtype}.stream2.codes_stream1"]]
    cache, alone_caches, starts, kept = None, [None, None], [0, 0], [0, 0]
    compared_with_golden = 0
    for call in info["calls"]:
        chunks = [s[:, p : p + n] for s, p, n in zip(streams, starts, call["chunk_input_lengths"])]
        batch, mask = right_pad(chunks, value=-1)
        output = tokenizer.streaming_decode(batch, mask, cache=cache, is_last_chunk=call["last_chunk"], **overlaps)
        cache = output.cache
        assert cache.processed_lengths == call["processed_lengths_after"]
        inputs = [k + n for k, n in zip(kept, call["chunk_input_lengths"])]
        for index, chunk in enumerate(chunks):
            alone = tokenizer.streaming_decode(
                chunk[None], cache=alone_caches[index], is_last_chunk=call["last_chunk"], **overlaps
            )
            alone_caches[index] = alone.cache
            torch.testing.assert_close(valid_audio(output, index), valid_audio(alone), atol=batch_atol, rtol=0)
            if inputs[index] == max(inputs):
                expected = g[f"{dtype}.stream2.call{call['call']}.wav{index}"].float()
                torch.testing.assert_close(valid_audio(output, index), expected, atol=atol, rtol=0)
                compared_with_golden += 1
        starts = [p + n for p, n in zip(starts, call["chunk_input_lengths"])]
        kept = call["cache_hidden_lengths_after"]
    assert compared_with_golden == 4
    # Last call: stream 0 gets exactly its remaining codes of audio (21 for tok_a), not the padded tail (quirk T3).
    before_last, last = info["calls"][-2], info["calls"][-1]
    remaining = before_last["cache_hidden_lengths_after"][0] + last["chunk_input_lengths"][0]
    remaining -= before_last["processed_lengths_after"][0]
    assert output.audio_values_lengths[0] == remaining * 960


def test_streaming_rejects_bad_state():
    tokenizer = model("tok_a")
    codes = golden("tok_a")["fp32.codes_single_segment"][None, :8, :30]
    first = tokenizer.streaming_decode(codes, left_overlap=20, right_overlap=6)
    with pytest.raises(ValueError, match="streams"):
        tokenizer.streaming_decode(codes.expand(2, -1, -1), cache=first.cache)
    with pytest.raises(ValueError, match="quantizers"):
        tokenizer.streaming_decode(codes[:, :4], cache=first.cache)
    with pytest.raises(ValueError, match="left_overlap >= right_overlap"):
        tokenizer.streaming_decode(codes, left_overlap=5, right_overlap=6)


# ------------------------------------------------------------------------------------------------------ bf16


@pytest.mark.parametrize("case", CASES)
def test_bf16_against_original_bf16(case):
    g = golden(case)
    tokenizer = model(case, dtype=torch.bfloat16)
    output = tokenizer.encode(mel(case))
    codes, expected_codes = output.audio_codes[0], g["bf16.codes_single_segment"]
    assert (codes == expected_codes).float().mean() >= 0.90
    assert (codes[0] == expected_codes[0]).float().mean() >= 0.95
    assert output.unquantized_hidden_states.dtype == torch.bfloat16
    torch.testing.assert_close(
        output.unquantized_hidden_states.float(), g["bf16.encoder_hidden_states_unquantized"].float(), atol=0.1, rtol=0
    )
    # RVQ in float32 with the bf16-rounded codebooks, exactly as the original.
    torch.testing.assert_close(tokenizer.quantizer.decode(expected_codes), g["bf16.decode_vq_all"], atol=0, rtol=0)
    for name, codes_in in (
        ("decode_wav_q8", expected_codes[:8]),
        ("decode_wav_all_q", expected_codes),
        ("decode_wav_q8_from_fp32_codes", g["fp32.codes_single_segment"][:8]),
    ):
        audio = tokenizer.decode(codes_in[None]).audio_values
        assert audio.dtype == torch.float32
        torch.testing.assert_close(audio, g[f"bf16.{name}"].float(), atol=BF16_WAV_ATOL, rtol=0)
    # bf16 streaming: test_streaming_single_stream_matches_original and test_streaming_two_streams.


# ------------------------------------------------------------------------------------------------- attention


def dense_reference_attention(module, hidden, lengths, left, right, causal):
    """float64 attention with the flash-attn window rule, from the module's own projections."""
    batch, length, _ = hidden.shape
    heads, head_dim = module.num_heads, module.head_dim
    cos, sin = MiMoAudioTokenizerRotaryEmbedding(head_dim, 10000.0)(length, hidden.device, torch.float64)

    def rope(x):
        half = head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def project(layer):
        return layer(hidden).double().view(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = rope(project(module.q_proj)), rope(project(module.k_proj)), project(module.v_proj)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = torch.ones(length, length, dtype=torch.bool)
    if left >= 0:
        allowed &= i - j <= left
    if right >= 0:
        allowed &= j - i <= right
    if causal:
        allowed &= j <= i
    allowed = allowed[None, None] & (j[None] < lengths[:, None, None]).unsqueeze(1)
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    output = (weights @ v).transpose(1, 2).reshape(batch, length, -1)
    return module.out_proj(output.float())


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "window, causal",
    [
        ((40, 10), False),
        ((3, 0), False),
        ((0, 0), False),
        ((5, -1), False),
        ((-1, 7), False),
        ((-1, -1), False),
        ((6, -1), True),
        ((-1, -1), True),
        ((2, 9), True),
    ],
)
def test_windowed_attention_matches_dense_reference(implementation, window, causal, monkeypatch):
    """Padded batch of 2, against float64 at 1e-5; query blocks of 32 so that 150 positions span several blocks."""
    monkeypatch.setattr(MiMoAudioTokenizerAttention, "query_block_size", 32)
    torch.manual_seed(0)
    config = MiMoAudioTokenizerConfig(d_model=32, encoder_attention_heads=4, decoder_attention_heads=4)
    config._attn_implementation = implementation
    module = MiMoAudioTokenizerAttention(config, 32, 4, list(window), causal).eval()
    hidden = torch.randn(2, 150, 32)
    lengths = torch.tensor([150, 83])
    rotary = MiMoAudioTokenizerRotaryEmbedding(8, 10000.0)(150, hidden.device, hidden.dtype)
    with torch.no_grad():
        output = module(hidden, rotary, lengths)
        expected = dense_reference_attention(module, hidden, lengths, *window, causal)
    for index, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(output[index, :length], expected[index, :length], atol=1e-5, rtol=0)


def patch_attention_function(monkeypatch, implementation, wrap):
    """Replaces the attention function the codec gets for `implementation` by `wrap(original)`: the codec's own
    `eager_attention_forward`, else the entry of Transformers' `ALL_ATTENTION_FUNCTIONS`."""
    if implementation == "eager":
        original = modeling_mimo_audio_tokenizer.eager_attention_forward
        monkeypatch.setattr(modeling_mimo_audio_tokenizer, "eager_attention_forward", wrap(original))
    else:
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, implementation, wrap(ALL_ATTENTION_FUNCTIONS[implementation]))


@pytest.mark.parametrize("implementation, padded", [("eager", False), ("eager", True), ("sdpa", True)])
@pytest.mark.parametrize("window, causal", [((40, 10), False), ((-1, -1), False), ((-1, -1), True), ((5, -1), False)])
def test_attention_memory_is_linear(implementation, padded, window, causal, monkeypatch):
    """Structural check on the eager path and the masked SDPA path: the score matrix of every attention call
    (`batch x queries x keys` per head; the mask is at most that) holds at most `query_block_size` entries per
    position of the batch, never `length x length`, so the largest one grows linearly with the length.
    (Unpadded full/causal SDPA passes no mask: tested below.)"""
    calls = []

    def recording_attention(function):
        def attention(module, query, key, value, mask, **kwargs):
            calls.append((query.shape[0] * query.shape[2] * key.shape[2], mask.numel()))
            return function(module, query, key, value, mask, **kwargs)

        return attention

    patch_attention_function(monkeypatch, implementation, recording_attention)
    config = MiMoAudioTokenizerConfig(vocoder_dim=16, vocoder_attention_heads=2)
    config._attn_implementation = implementation
    module = MiMoAudioTokenizerAttention(config, 16, 2, list(window), causal).eval()
    peaks = {}
    for length in (1000, 2000):
        calls.clear()
        batch_lengths = torch.tensor([length, length - 37] if padded else [length])
        hidden = torch.randn(len(batch_lengths), length, 16)
        rotary = MiMoAudioTokenizerRotaryEmbedding(8, 10000.0)(length, hidden.device, hidden.dtype)
        with torch.no_grad():
            module(hidden, rotary, batch_lengths)
        scores, masks = max(calls)
        assert masks <= scores  # (batch or blocks, 1, queries, keys)
        peaks[length] = scores
        assert scores <= len(batch_lengths) * length * module.query_block_size
    assert peaks[2000] <= 2 * peaks[1000]


@pytest.mark.parametrize("causal", [False, True])
def test_unpadded_full_attention_with_sdpa_passes_no_mask(causal, monkeypatch):
    masks = []

    def recording_sdpa(sdpa):
        def attention(module, query, key, value, mask, **kwargs):
            masks.append(mask)
            return sdpa(module, query, key, value, mask, **kwargs)

        return attention

    patch_attention_function(monkeypatch, "sdpa", recording_sdpa)
    config = MiMoAudioTokenizerConfig(vocoder_dim=16, vocoder_attention_heads=2)
    config._attn_implementation = "sdpa"
    module = MiMoAudioTokenizerAttention(config, 16, 2, [-1, -1], causal).eval()
    hidden = torch.randn(1, 300, 16)
    rotary = MiMoAudioTokenizerRotaryEmbedding(8, 10000.0)(300, hidden.device, hidden.dtype)
    with torch.no_grad():
        module(hidden, rotary, torch.tensor([300]))
    assert masks == [None]


def test_istft_center_padding_equals_torch_istft():
    torch.manual_seed(0)
    config = MiMoAudioTokenizerConfig(
        vocoder_dim=16, vocoder_attention_heads=2, nfft=64, hop_length=16, vocoder_padding="center"
    )
    head = MiMoAudioTokenizerISTFTHead(config)
    hidden = torch.randn(1, 20, 16)
    with torch.no_grad():
        audio, lengths = head(hidden, torch.tensor([20]))
        out = head.out(hidden).transpose(1, 2)
        magnitude, phase = out.chunk(2, dim=1)
        spectrum = torch.clip(torch.exp(magnitude), max=1e2) * (torch.cos(phase) + 1j * torch.sin(phase))
        expected = torch.istft(spectrum, 64, 16, 64, torch.hann_window(64), center=True)
    assert lengths.tolist() == [expected.shape[-1]] == [19 * 16]
    torch.testing.assert_close(audio, expected, atol=1e-6, rtol=0)


def test_other_configuration_runs_and_is_batch_invariant():
    """No average pool, RMSNorm, no skip connection, causal encoder, windows everywhere, odd strides."""
    torch.manual_seed(0)
    config = MiMoAudioTokenizerConfig(
        d_model=24,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        encoder_skip_layer_id=None,
        encoder_causal=True,
        encoder_attn_window_size=[4, -1],
        decoder_layers=1,
        decoder_attention_heads=3,
        decoder_ffn_dim=32,
        decoder_kernel_size=4,
        decoder_stride_size=3,
        decoder_attn_window_size=[3, 3],
        vocoder_dim=16,
        vocoder_intermediate_dim=24,
        vocoder_num_layers=1,
        vocoder_attention_heads=2,
        vocoder_attn_window_size=[5, 2],
        n_mels=10,
        nfft=64,
        hop_length=16,
        avg_pooler=1,
        stride_size=3,
        ln_type="RMSNorm",
        num_quantizers=3,
        codebook_size=[12, 5],
        segment_length=40,
    )
    tokenizer = MiMoAudioTokenizerModel(config).eval()
    features = torch.randn(2, 10, 101)
    mask = (torch.arange(101)[None] < torch.tensor([[101], [57]])).long()
    encoded = tokenizer.encode(features, mask)
    # segments [40, 40, 21] -> 14 + 14 + 7 codes; [40, 17] -> 14 + 6 codes (conv2 stride 3, padding 1)
    assert encoded.audio_codes_mask.sum(-1).tolist() == [35, 20]
    assert encoded.audio_codes[:, 2].max() < 5 and encoded.audio_codes[:, 0].max() < 12
    decoded = tokenizer.decode(encoded.audio_codes, encoded.audio_codes_mask)
    # each code: decoder transposed conv (kernel 4, stride 3, one causal frame cut) -> 3 frames of 16 samples
    assert decoded.audio_values_lengths.tolist() == [35 * 3 * 16, 20 * 3 * 16]
    for index in range(2):
        alone_codes = tokenizer.encode(features[index : index + 1, :, : int(mask[index].sum())])
        length = alone_codes.audio_codes.shape[-1]
        assert torch.equal(encoded.audio_codes[index, :, :length], alone_codes.audio_codes[0])
        alone_audio = tokenizer.decode(alone_codes.audio_codes)
        torch.testing.assert_close(valid_audio(decoded, index), valid_audio(alone_audio), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- loading and saving


def test_save_and_reload_round_trip(tmp_path):
    tokenizer = model("tok_a")
    tokenizer.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "quantizer.layers.0.embed" in saved and "encoder.down_sample_layer.weight" in saved
    assert not any("_codebook" in key or "istft" in key for key in saved)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mimo_audio_tokenizer"
    for loader in (MiMoAudioTokenizerModel, AutoModel, AutoModelForAudioTokenization):
        reloaded = loader.from_pretrained(tmp_path)
        assert type(reloaded) is MiMoAudioTokenizerModel
        assert reloaded.state_dict().keys() == tokenizer.state_dict().keys()
        for key, value in tokenizer.state_dict().items():
            assert torch.equal(reloaded.state_dict()[key], value), key
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MiMoAudioTokenizerConfig)
    codes = reloaded.encode(mel("tok_a")).audio_codes[0]
    assert torch.equal(codes, golden("tok_a")["fp32.codes_single_segment"])


def test_original_checkpoint_loads_through_auto_classes():
    tokenizer = AutoModelForAudioTokenization.from_pretrained(GOLDEN / "tok_b" / "checkpoint")
    assert type(tokenizer) is MiMoAudioTokenizerModel
    original = load_file(GOLDEN / "tok_b" / "checkpoint" / "model.safetensors")
    assert torch.equal(tokenizer.quantizer.layers[3].embed, original["encoder.quantizer.vq.layers.3._codebook.embed"])
    assert torch.equal(tokenizer.encoder.down_sample_layer.weight, original["encoder.down_sample_layer.0.weight"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("decoder.vocoder.head.out.bias"), "missing_keys.*decoder.vocoder.head.out.bias"),
        (lambda sd: sd.pop("encoder.quantizer.vq.layers.2._codebook.embed"), "missing_keys.*quantizer.layers.2.embed"),
        (lambda sd: sd.__setitem__("encoder.extra.weight", torch.zeros(2)), "unexpected_keys.*encoder.extra.weight"),
    ],
)
def test_checkpoint_with_missing_or_extra_tensors_is_refused(tmp_path, edit, message):
    state_dict = load_file(GOLDEN / "tok_a" / "checkpoint" / "model.safetensors")
    edit(state_dict)
    save_file(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(GOLDEN / "tok_a" / "checkpoint" / "config.json", tmp_path)
    with pytest.raises(ValueError, match=message):
        MiMoAudioTokenizerModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("sharded", [False, True])
def test_original_checkpoint_with_a_wrong_window_is_refused(tmp_path, sharded):
    """The ISTFT window is not loaded (the model rebuilds a Hann window), so a stored one must be that window."""
    state_dict = load_file(GOLDEN / "tok_a" / "checkpoint" / "model.safetensors")
    shutil.copy(GOLDEN / "tok_a" / "checkpoint" / "config.json", tmp_path)
    key = "decoder.vocoder.head.istft.window"

    def write(state_dict):
        if not sharded:
            save_file(state_dict, tmp_path / "model.safetensors", metadata={"format": "pt"})
            return
        shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
        for name, tensor in state_dict.items():
            shards[sorted(shards)[name.startswith("decoder.")]][name] = tensor
        for filename, shard in shards.items():
            save_file(shard, tmp_path / filename, metadata={"format": "pt"})
        weight_map = {name: filename for filename, shard in shards.items() for name in shard}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    write({**state_dict, key: state_dict[key].to(torch.bfloat16)})  # a bf16 Hann window is accepted
    tokenizer = MiMoAudioTokenizerModel.from_pretrained(tmp_path)
    assert torch.equal(tokenizer.decoder.vocoder.head.out.bias, state_dict["decoder.vocoder.head.out.bias"])
    write({**state_dict, key: torch.ones_like(state_dict[key])})
    with pytest.raises(ValueError, match="istft.window` is not a periodic Hann window of length 960"):
        MiMoAudioTokenizerModel.from_pretrained(tmp_path)


def test_convert_original_state_dict_accounts_for_every_tensor():
    config = MiMoAudioTokenizerConfig.from_pretrained(GOLDEN / "tok_a" / "checkpoint")
    original = load_file(GOLDEN / "tok_a" / "checkpoint" / "model.safetensors")
    converted, ignored = convert_original_state_dict(original, config)
    assert set(converted) == set(model("tok_a").state_dict())
    expected_ignored = {"decoder.vocoder.head.istft.window"} | {
        f"encoder.quantizer.vq.layers.{i}._codebook.{name}"
        for i in range(12)
        for name in ("cluster_size", "embed_avg", "inited")
    }
    assert set(ignored) == expected_ignored
    assert len(converted) + len(ignored) == len(original)
    # Already converted keys pass through.
    assert set(convert_original_state_dict(converted, config)[0]) == set(converted)

    with pytest.raises(ValueError, match="missing tensors.*encoder.conv1.bias"):
        convert_original_state_dict({k: v for k, v in original.items() if k != "encoder.conv1.bias"}, config)
    with pytest.raises(ValueError, match="unexpected tensors.*decoder.surprise"):
        convert_original_state_dict({**original, "decoder.surprise": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="shape mismatches.*encoder.conv1.bias"):
        convert_original_state_dict({**original, "encoder.conv1.bias": torch.zeros(3)}, config)
    with pytest.raises(ValueError, match="Hann"):
        convert_original_state_dict({**original, "decoder.vocoder.head.istft.window": torch.ones(960)}, config)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda m: {"input_features": m[:, :, :0]}, "empty"),
        (lambda m: {"input_features": m[0]}, "shape"),
        (lambda m: {"input_features": m[:, :-1]}, "mel bins"),
        (lambda m: {"input_features": m.long()}, "floating point"),
        (lambda m: {"input_features": m.index_fill(2, torch.tensor([7]), float("nan"))}, "NaN or infinite"),
        (lambda m: {"input_features": m.index_fill(2, torch.tensor([3]), float("inf"))}, "NaN or infinite"),
        (lambda m: {"input_features": m, "input_features_mask": torch.ones(1, 5)}, "must have shape"),
        (lambda m: {"input_features": m, "input_features_mask": torch.zeros(1, m.shape[-1])}, "no valid position"),
        (lambda m: {"input_features": m, "input_features_mask": torch.arange(m.shape[-1])[None] % 2}, "right-padded"),
        (lambda m: {"input_features": m, "input_features_mask": torch.full((1, m.shape[-1]), 2)}, "0/1"),
        (lambda m: {"input_features": m, "num_quantizers": 0}, "num_quantizers"),
        (lambda m: {"input_features": m, "num_quantizers": 13}, "num_quantizers"),
    ],
)
def test_encode_rejects_bad_input(make_input, message):
    with pytest.raises(ValueError, match=message):
        model("tok_a").encode(**make_input(mel("tok_a")))


def test_nan_in_the_padding_is_fine_but_not_in_the_valid_part():
    features = mel("tok_a").clone()
    features[..., 200:] = float("nan")
    mask = (torch.arange(features.shape[-1]) < 200).long()[None]
    assert model("tok_a").encode(features, mask).audio_codes_mask.sum() == 50
    mask[0, :201] = 1
    with pytest.raises(ValueError, match="NaN"):
        model("tok_a").encode(features, mask)


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda c: {"audio_codes": c[0]}, "shape"),
        (lambda c: {"audio_codes": c.float()}, "integer"),
        (lambda c: {"audio_codes": c[:, :, :0]}, "empty"),
        (lambda c: {"audio_codes": torch.cat([c, c[:, :1]], dim=1)}, "quantizers"),
        (lambda c: {"audio_codes": c.index_fill(2, torch.tensor([4]), 64)}, r"quantizer 0 must lie in \[0, 63\]"),
        (lambda c: {"audio_codes": c.index_fill(2, torch.tensor([4]), -1)}, r"quantizer 0 must lie in \[0, 63\]"),
        # 20 is a valid code for quantizer 0 (64 entries) but not for quantizer 2 (16 entries).
        (lambda c: {"audio_codes": c.index_fill(2, torch.tensor([9]), 20)}, r"quantizer 2 must lie in \[0, 15\]"),
        (lambda c: {"audio_codes": c, "audio_codes_mask": torch.ones(2, c.shape[-1])}, "must have shape"),
        (lambda c: {"audio_codes": c, "audio_codes_mask": torch.ones(1, c.shape[-1] + 1)}, "must have shape"),
    ],
)
def test_decode_rejects_bad_input(make_input, message):
    codes = golden("tok_a")["fp32.codes_single_segment"][None].clone()
    with pytest.raises(ValueError, match=message):
        model("tok_a").decode(**make_input(codes))


# ------------------------------------------------------------------------------- segmented encode / decode of clips


@pytest.mark.parametrize("segments_per_call", [None, 1, 2])
def test_encode_clips_equals_encode_of_each_clip_alone(segments_per_call):
    """Clips longer than `segment_length` are cut into segments; however the segments are batched, every clip gets
    exactly the codes `encode` gives it alone, and `progress` counts the segments."""
    tokenizer = MiMoAudioTokenizerModel.from_pretrained(GOLDEN / "tok_a" / "checkpoint", segment_length=64)
    full = mel("tok_a")[0]
    clips = [full[:, :150], full[:, :40], full]  # 3, 1 and ceil(frames / 64) segments
    calls = []
    codes = tokenizer.encode_clips(
        clips, num_quantizers=8, segments_per_call=segments_per_call, progress=lambda *done: calls.append(done)
    )
    total = sum(-(-clip.shape[-1] // 64) for clip in clips)
    per_call = segments_per_call or total
    assert calls == [(min(done, total), total) for done in range(per_call, total + per_call, per_call)]
    for clip, clip_codes in zip(clips, codes):
        assert torch.equal(clip_codes, tokenizer.encode(clip[None], num_quantizers=8).audio_codes[0])


def test_decode_clips_in_segments_of_1500_frames():
    """Each clip is decoded in segments of `DECODE_SEGMENT_FRAMES` whose audio is concatenated: one segment per call
    gives exactly each segment's `decode`, all segments in one padded batch give the same audio."""
    tokenizer = model("tok_a")
    codes = golden("tok_a")["fp32.codes_single_segment"][:8]  # (8, 63)
    clips = [codes, codes[:, :20]]
    one_by_one = tokenizer.decode_clips(clips, segment_frames=25, segments_per_call=1)
    expected = [
        torch.cat([valid_audio(tokenizer.decode(clip[None, :, s : s + 25]))[0] for s in range(0, clip.shape[-1], 25)])
        for clip in clips
    ]
    for waveform, reference in zip(one_by_one, expected):
        assert waveform.dtype == torch.float32 and waveform.device.type == "cpu"
        assert torch.equal(waveform, reference)
    batched = tokenizer.decode_clips(clips, segment_frames=25)
    for waveform, reference in zip(batched, expected):
        torch.testing.assert_close(waveform, reference, rtol=0, atol=WAV_ATOL)
    (whole,) = tokenizer.decode_clips([codes])  # 63 frames < 1500: one segment
    assert torch.equal(whole, valid_audio(tokenizer.decode(codes[None]))[0])
    assert tokenizer.decode_clips([]) == []


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: t.encode_clips([torch.zeros(32)]), r"input_features\[0\]"),
        (lambda t: t.encode_clips([torch.zeros(32, 0)]), r"input_features\[0\]"),
        (lambda t: t.decode_clips([torch.zeros(8, 5, dtype=torch.long), torch.zeros(8)]), r"audio_codes\[1\]"),
        (lambda t: t.decode_clips([torch.zeros(8, 5, dtype=torch.long)], segment_frames=0), "segment size"),
        (lambda t: t.encode_clips([torch.zeros(32, 5)], segments_per_call=0), "segments_per_call"),
    ],
)
def test_segmented_clips_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(model("tok_a"))
