"""MiMoAudioFeatureExtractor and the resampler against the original pipeline's goldens.

Tolerances: with MKL on its cross-CPU reproducible path (conftest sets MKL_CBWR=COMPATIBLE) the port is within 1e-6
of the goldens (0.0 on the machine they were checked on first); the checks allow 1e-5 on log-mel values (range about
[-16, 5]) and 1e-6 on waveforms (range [-1, 1]). Without the pin, MKL's AVX2/AVX-512 FFT paths move quiet bins of the
tiny tok_a codec by up to 1e-3: float32 FFT rounding that the original, calling the same `torch.stft`, shares.
Comparisons with independent float64 formulas allow 1e-5 (float32 arithmetic in the port).
"""

import json
import logging
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import AUDIO, GOLDEN
from safetensors.torch import load_file
from transformers import AutoFeatureExtractor
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from transformers_mimo import MiMoAudioFeatureExtractor, resample_waveform


MEL_ATOL = 1e-5
WAV_ATOL = 1e-6


def _golden(case):
    manifest = json.loads((GOLDEN / case / "manifest.json").read_text())
    return load_file(GOLDEN / case / "golden.safetensors"), manifest


def _extractor_for(manifest):
    config = json.loads((GOLDEN / manifest["case"] / "checkpoint" / "config.json").read_text())
    return MiMoAudioFeatureExtractor(
        n_mels=config["n_mels"],
        sampling_rate=config["sampling_rate"],
        n_fft=config["nfft"],
        hop_length=config["hop_length"],
        win_length=config["window_size"],
        fmin=config["fmin"],
        fmax=config["fmax"],
    )


def _native_rate(manifest):
    wav_native = manifest["tensors"]["wav_native"]
    return int(wav_native["description"].split("native rate ")[1].split(" Hz")[0])


def _resample_reference(x, orig, new, outputs=None, lowpass_filter_width=6, rolloff=0.99):
    """Direct float64 evaluation of the Hann-windowed sinc interpolation sum for output samples `outputs` (all)."""
    x = np.asarray(x, dtype=np.float64)
    cutoff = min(orig, new) * rolloff  # Hz
    outputs = np.arange(math.ceil(len(x) * new / orig)) if outputs is None else np.asarray(outputs)
    i = np.arange(len(x))[None, :]
    j = outputs[:, None]
    t = (i / orig - j / new) * cutoff  # distance in zero crossings of the low-pass sinc
    window = np.where(np.abs(t) < lowpass_filter_width, np.cos(np.pi * t / lowpass_filter_width / 2) ** 2, 0.0)
    return (np.sinc(t) * window * (cutoff / orig)) @ x


@pytest.mark.parametrize("case", ["tok_a", "tok_b"])
def test_log_mel_equals_golden(case):
    golden, manifest = _golden(case)
    extractor = _extractor_for(manifest)
    out = extractor(golden["wav"], sampling_rate=24000, return_tensors="pt")
    n_mels, frames = golden["mel"].shape
    assert out["input_features"].shape == (1, n_mels, frames)
    assert out["input_features"].dtype == torch.float32
    assert frames == golden["wav"].shape[0] // 240 + 1
    torch.testing.assert_close(out["input_features"][0], golden["mel"], rtol=0, atol=MEL_ATOL)
    assert out["input_features_mask"].tolist() == [[1] * frames]


@pytest.mark.parametrize("case", ["tok_a", "tok_b"])
def test_native_rate_audio_goes_through_resampler(case):
    golden, manifest = _golden(case)
    rate = _native_rate(manifest)
    resampled = resample_waveform(golden["wav_native"], rate, 24000)
    assert resampled.shape == golden["wav"].shape
    torch.testing.assert_close(resampled, golden["wav"], rtol=0, atol=WAV_ATOL)
    out = _extractor_for(manifest)(golden["wav_native"], sampling_rate=rate, return_tensors="pt")
    torch.testing.assert_close(out["input_features"][0], golden["mel"], rtol=0, atol=MEL_ATOL)


def test_tok_a_is_a_real_16khz_to_24khz_case():
    golden, manifest = _golden("tok_a")
    assert _native_rate(manifest) == 16000
    assert golden["wav_native"].shape == (40000,) and golden["wav"].shape == (60000,)


def test_wav_fixture_file_gives_golden_mel():
    # tok_b's golden waveform is the first 3.0 s of this clip (24 kHz, 16-bit PCM).
    golden, manifest = _golden("tok_b")
    audio, rate = sf.read(AUDIO / "prompt_speech_en_w.wav", dtype="float32")
    assert rate == 24000
    np.testing.assert_array_equal(audio[:72000], golden["wav"].numpy())
    out = _extractor_for(manifest)(audio[:72000], sampling_rate=rate, return_tensors="pt")
    torch.testing.assert_close(out["input_features"][0], golden["mel"], rtol=0, atol=MEL_ATOL)


@pytest.mark.parametrize(("orig", "new"), [(16000, 24000), (44100, 24000), (8000, 24000), (24000, 16000)])
def test_resampler_matches_float64_sinc_formula(orig, new):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(900, generator=generator) * 0.3
    y = resample_waveform(x, orig, new)
    reference = _resample_reference(x.numpy(), orig, new)
    assert y.shape == (math.ceil(900 * new / orig),)
    np.testing.assert_allclose(y.numpy(), reference, rtol=0, atol=1e-5)


def test_resampler_on_mp3_fixture_and_extractor_uses_it():
    audio, rate = sf.read(AUDIO / "weather_today_zh.mp3", dtype="float32")
    assert rate == 32000 and audio.ndim == 1
    waveform = torch.from_numpy(audio)
    resampled = resample_waveform(waveform, rate, 24000)
    assert resampled.shape == (math.ceil(len(audio) * 3 / 4),)
    np.testing.assert_allclose(
        resampled[4000:4400].numpy(), _resample_reference(audio, rate, 24000, np.arange(4000, 4400)), rtol=0, atol=1e-5
    )
    extractor = MiMoAudioFeatureExtractor()
    from_file = extractor(audio, sampling_rate=rate, return_tensors="pt")
    from_resampled = extractor(resampled, sampling_rate=24000, return_tensors="pt")
    assert from_file["input_features"].shape == (1, 128, resampled.shape[0] // 240 + 1)
    assert torch.equal(from_file["input_features"], from_resampled["input_features"])


def test_resampler_keeps_leading_dims_and_identity():
    golden, _ = _golden("tok_a")
    wav = golden["wav_native"]
    stacked = torch.stack([wav, 0.5 * wav]).reshape(2, 1, -1)
    out = resample_waveform(stacked, 16000, 24000)
    assert out.shape == (2, 1, 60000)
    torch.testing.assert_close(out[0, 0], golden["wav"], rtol=0, atol=WAV_ATOL)
    torch.testing.assert_close(out[1, 0], resample_waveform(0.5 * wav, 16000, 24000), rtol=0, atol=0)
    assert resample_waveform(wav, 16000, 16000) is wav
    assert resample_waveform(wav.double(), 16000, 24000).dtype == torch.float64


def test_resampler_errors():
    x = torch.zeros(100)
    for bad in (0, -16000, 22050.5, float("nan"), True, "16000"):
        with pytest.raises(ValueError, match="orig_sampling_rate"):
            resample_waveform(x, bad, 24000)
    with pytest.raises(ValueError, match="target_sampling_rate"):
        resample_waveform(x, 16000, 0)
    with pytest.raises(ValueError, match="floating-point"):
        resample_waveform(torch.zeros(100, dtype=torch.int16), 16000, 24000)
    with pytest.raises(ValueError, match="time axis"):
        resample_waveform(torch.tensor(0.5), 16000, 24000)
    with pytest.raises(ValueError, match="share only the factor 1"):
        resample_waveform(x, 24001, 24000)
    assert resample_waveform(x, 44100, 24000).shape == (55,)  # common rates reduce to small filters (147 -> 80)
    with pytest.raises(ValueError, match="lowpass_filter_width"):
        resample_waveform(x, 16000, 24000, lowpass_filter_width=0)
    with pytest.raises(ValueError, match="rolloff"):
        resample_waveform(x, 16000, 24000, rolloff=1.5)


def test_padded_batch_equals_each_clip_alone():
    golden, manifest = _golden("tok_a")
    extractor = _extractor_for(manifest)
    long_clip = golden["wav_native"].numpy()
    short_clip = long_clip[5000:26123]  # 21123 samples at 16 kHz -> 31685 at 24 kHz -> 133 frames
    batch = extractor([long_clip, short_clip], sampling_rate=16000, return_tensors="pt")
    features, mask = batch["input_features"], batch["input_features_mask"]
    assert features.shape == (2, 32, 251) and mask.shape == (2, 251) and mask.dtype == torch.int32
    assert mask[0].sum() == 251 and mask[1].tolist() == [1] * 133 + [0] * 118
    for index, clip in enumerate([long_clip, short_clip]):
        alone = extractor(clip, sampling_rate=16000, return_tensors="pt")["input_features"][0]
        length = alone.shape[-1]
        assert torch.equal(features[index, :, :length], alone)
        assert torch.all(features[index, :, length:] == extractor.padding_value)
    torch.testing.assert_close(features[0], golden["mel"], rtol=0, atol=MEL_ATOL)


def test_stereo_is_downmixed_by_channel_mean():
    golden, manifest = _golden("tok_b")
    extractor = _extractor_for(manifest)
    left = golden["wav"]
    right = torch.flip(left, dims=[0]) * 0.25
    stereo = torch.stack([left, right])
    out = extractor(stereo, sampling_rate=24000, return_tensors="pt")["input_features"]
    expected = extractor((left + right) / 2, sampling_rate=24000, return_tensors="pt")["input_features"]
    assert torch.equal(out, expected)
    assert not torch.allclose(out, extractor(left, sampling_rate=24000, return_tensors="pt")["input_features"])
    # Identical channels downmix to the mono clip itself.
    dual_mono = extractor(torch.stack([left, left]), sampling_rate=24000, return_tensors="pt")["input_features"][0]
    torch.testing.assert_close(dual_mono, golden["mel"], rtol=0, atol=MEL_ATOL)
    with pytest.raises(ValueError, match=r"\(samples, channels\)"):
        extractor(stereo.T.numpy(), sampling_rate=24000)


def test_input_types_agree():
    golden, manifest = _golden("tok_b")
    extractor = _extractor_for(manifest)
    wav = golden["wav"][:30000]
    reference = extractor(wav, sampling_rate=24000, return_tensors="pt")["input_features"]
    for variant in (wav.numpy(), wav.numpy().astype(np.float64), wav.tolist(), wav.double()):
        assert torch.equal(extractor(variant, sampling_rate=24000, return_tensors="pt")["input_features"], reference)
    as_numpy = extractor(wav.numpy(), sampling_rate=24000, return_tensors="np")
    assert isinstance(as_numpy["input_features"], np.ndarray)
    np.testing.assert_array_equal(as_numpy["input_features"], reference.numpy())


def test_non_default_parameters_match_transformers_audio_utils():
    """Config-driven STFT/mel settings against transformers' numpy implementation (≤1e-4 on log-mel)."""
    sampling_rate, n_fft, win_length, hop_length, n_mels, fmin, fmax = 16000, 1024, 800, 200, 40, 30.0, 7000.0
    extractor = MiMoAudioFeatureExtractor(
        n_mels=n_mels,
        sampling_rate=sampling_rate,
        n_fft=n_fft,
        hop_length=hop_length,
        win_length=win_length,
        fmin=fmin,
        fmax=fmax,
    )
    waveform = np.random.default_rng(0).standard_normal(16123).astype(np.float32) * 0.1
    ours = extractor(waveform, sampling_rate=sampling_rate, return_tensors="np")["input_features"][0]
    filters = mel_filter_bank(n_fft // 2 + 1, n_mels, fmin, fmax, sampling_rate, norm=None, mel_scale="htk")
    reference = spectrogram(
        waveform,
        window_function(win_length, "hann"),
        frame_length=win_length,
        hop_length=hop_length,
        fft_length=n_fft,
        power=1.0,
        center=True,
        pad_mode="reflect",
        mel_filters=filters,
        mel_floor=1e-7,
        log_mel="log",
    )
    assert ours.shape == reference.shape == (n_mels, 16123 // hop_length + 1)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    extractor = MiMoAudioFeatureExtractor(
        n_mels=24, sampling_rate=16000, n_fft=512, hop_length=160, win_length=400, fmin=20.0, fmax=7600.0
    )
    extractor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "MiMoAudioFeatureExtractor"
    expected = {
        "n_mels": 24,
        "feature_size": 24,
        "sampling_rate": 16000,
        "n_fft": 512,
        "hop_length": 160,
        "win_length": 400,
        "fmin": 20.0,
        "fmax": 7600.0,
    }
    assert {key: saved[key] for key in expected} == expected
    for loader in (MiMoAudioFeatureExtractor, AutoFeatureExtractor):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is MiMoAudioFeatureExtractor
        assert loaded.to_dict() == extractor.to_dict()
    waveform = np.sin(np.arange(8000) * 0.05).astype(np.float32)
    first = extractor(waveform, sampling_rate=16000, return_tensors="pt")["input_features"]
    second = loaded(waveform, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert first.shape == (1, 24, 51) and torch.equal(first, second)


def test_bad_audio_raises_clear_errors():
    extractor = MiMoAudioFeatureExtractor(n_mels=32)
    good = np.zeros(2400, dtype=np.float32)
    cases = [
        ([], "empty"),
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.array([0.1, np.nan] * 1000, dtype=np.float32), "NaN or infinite"),
        (np.array([0.1, np.inf] * 1000, dtype=np.float32), "NaN or infinite"),
        ([good, np.full(2400, -np.inf, dtype=np.float32)], "item 1 contains NaN"),
        (np.zeros((1, 2, 2400), dtype=np.float32), "expected \\(samples,\\) or \\(channels, samples\\)"),
        (np.float32(0.5), "must be a waveform"),
        (np.zeros(2400, dtype=np.int16), "int16"),
        (torch.zeros(2400, dtype=torch.int32), "int32"),
        (np.zeros(100, dtype=np.float32), "at least 481"),
    ]
    for audio, message in cases:
        with pytest.raises(ValueError, match=message):
            extractor(audio, sampling_rate=24000)
    for bad_rate in (0, -24000, 16000.5):
        with pytest.raises(ValueError, match="orig_sampling_rate"):
            extractor(good, sampling_rate=bad_rate)
    with pytest.raises(ValueError, match="unexpected arguments: \\['sample_rate'\\]"):
        extractor(good, sample_rate=16000)


def test_missing_sampling_rate_warns_and_assumes_extractor_rate(caplog):
    extractor = MiMoAudioFeatureExtractor(n_mels=32)
    waveform = np.sin(np.arange(4800) * 0.01).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        implicit = extractor(waveform, return_tensors="pt")["input_features"]
    assert "sampling_rate" in caplog.text
    assert torch.equal(implicit, extractor(waveform, sampling_rate=24000, return_tensors="pt")["input_features"])


def test_invalid_parameters_raise():
    with pytest.raises(ValueError, match="win_length"):
        MiMoAudioFeatureExtractor(n_fft=512, win_length=960)
    with pytest.raises(ValueError, match="fmax"):
        MiMoAudioFeatureExtractor(fmax=13000.0)
    with pytest.raises(ValueError, match="`fmin` must be a number"):
        MiMoAudioFeatureExtractor(fmin=None)
    with pytest.raises(ValueError, match="hop_length"):
        MiMoAudioFeatureExtractor(hop_length=0)
    with pytest.raises(ValueError, match="feature_size"):
        MiMoAudioFeatureExtractor(n_mels=32, feature_size=80)
    with pytest.raises(ValueError, match="padding_side"):
        MiMoAudioFeatureExtractor(padding_side="left")
