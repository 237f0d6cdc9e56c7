"""Audio helpers for MiMo-Audio: reading audio files, band-limited resampling and the HTK mel filterbank.

The resampling and the filterbank are pure PyTorch and reproduce torchaudio's defaults bit for bit (``torchaudio.functional.resample`` and
``torchaudio.functional.melscale_fbanks(norm=None, mel_scale="htk")``), so no torchaudio dependency is needed.
"""

import io
import math
import os
import urllib.request

import soundfile as sf
import torch
import torch.nn.functional as F


__all__ = ["htk_mel_filter_bank", "read_audio", "resample_waveform"]

# Above this product of the reduced rates the resampling kernel (new_rate x ~orig_rate values) exceeds ~1 GB.
_MAX_REDUCED_RATE_PRODUCT = 2**28


def _as_positive_integer_rate(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a positive integer number of Hz, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer number of Hz, got {value!r}.")
    if int(value) != value:
        raise ValueError(f"`{name}` must be a whole number of Hz, got {value!r}.")
    return int(value)


def _sinc_resampling_kernel(
    orig_rate: int, new_rate: int, lowpass_filter_width: int, rolloff: float, dtype: torch.dtype, device
) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc kernel for reduced rates `orig_rate -> new_rate` (already divided by their gcd).

    Returns the kernel `(new_rate, 1, 2 * width + orig_rate)` (one filter per output phase) and `width`, the number of
    input samples of context on each side.
    """
    cutoff = min(orig_rate, new_rate) * rolloff  # anti-aliasing cutoff in units of the reduced rates
    width = math.ceil(lowpass_filter_width * orig_rate / cutoff)
    # Input sample offsets (in seconds of the reduced orig rate) seen by each output phase.
    input_times = torch.arange(-width, width + orig_rate, dtype=dtype, device=device)[None, None] / orig_rate
    output_times = torch.arange(0, -new_rate, -1, dtype=dtype, device=device)[:, None, None] / new_rate
    t = (output_times + input_times) * cutoff
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    hann = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones((), dtype=t.dtype, device=device), t.sin() / t)
    return sinc * (hann * (cutoff / orig_rate)), width


def resample_waveform(
    waveform: torch.Tensor,
    orig_sampling_rate: int,
    target_sampling_rate: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Resample `waveform` with a Hann-windowed sinc filter (band-limited interpolation).

    Equal to `torchaudio.functional.resample` with its defaults (`resampling_method="sinc_interp_hann"`,
    `lowpass_filter_width=6`, `rolloff=0.99`); the arithmetic runs in the waveform's dtype, as there.

    Args:
        waveform (`torch.Tensor` of shape `(..., samples)`): floating-point audio; leading dims are kept.
        orig_sampling_rate (`int`): rate of `waveform` in Hz.
        target_sampling_rate (`int`): wanted rate in Hz.
        lowpass_filter_width (`int`): zero crossings of the sinc kept on each side (sharper but slower when larger).
        rolloff (`float`): cutoff as a fraction of the lower Nyquist frequency, in `(0, 1]`.

    Returns:
        `torch.Tensor` of shape `(..., ceil(samples * target_sampling_rate / orig_sampling_rate))`; the input itself
        when both rates are equal.
    """
    orig_sampling_rate = _as_positive_integer_rate(orig_sampling_rate, "orig_sampling_rate")
    target_sampling_rate = _as_positive_integer_rate(target_sampling_rate, "target_sampling_rate")
    if not isinstance(waveform, torch.Tensor):
        raise ValueError(f"`waveform` must be a torch.Tensor, got {type(waveform).__name__}.")
    if not waveform.is_floating_point():
        raise ValueError(f"`waveform` must be a floating-point tensor, got dtype {waveform.dtype}.")
    if waveform.ndim == 0:
        raise ValueError("`waveform` must have a time axis (shape `(..., samples)`), got a 0-d tensor.")
    if type(lowpass_filter_width) is not int or lowpass_filter_width <= 0:
        raise ValueError(f"`lowpass_filter_width` must be a positive integer, got {lowpass_filter_width!r}.")
    if not 0.0 < rolloff <= 1.0:
        raise ValueError(f"`rolloff` must be in (0, 1], got {rolloff!r}.")
    if orig_sampling_rate == target_sampling_rate:
        return waveform

    gcd = math.gcd(orig_sampling_rate, target_sampling_rate)
    orig_rate, new_rate = orig_sampling_rate // gcd, target_sampling_rate // gcd
    if orig_rate * new_rate > _MAX_REDUCED_RATE_PRODUCT:
        raise ValueError(
            f"Cannot resample {orig_sampling_rate} Hz -> {target_sampling_rate} Hz: the rates share only the factor "
            f"{gcd}, so the polyphase filter would need {new_rate} phases of {orig_rate}+ taps. Resample through a "
            "standard rate (e.g. 48000 or 44100 Hz) first."
        )
    kernel, width = _sinc_resampling_kernel(
        orig_rate, new_rate, lowpass_filter_width, rolloff, waveform.dtype, waveform.device
    )

    leading_shape, num_samples = waveform.shape[:-1], waveform.shape[-1]
    flat = F.pad(waveform.reshape(-1, 1, num_samples), (width, width + orig_rate))
    # (N, new_rate, blocks): output phase p of block b is output sample b * new_rate + p.
    phases = F.conv1d(flat, kernel, stride=orig_rate)
    resampled = phases.transpose(1, 2).reshape(flat.shape[0], -1)
    target_length = -(-new_rate * num_samples // orig_rate)
    return resampled[:, :target_length].reshape(*leading_shape, target_length)


def htk_mel_filter_bank(
    num_frequency_bins: int, num_mel_filters: int, min_frequency: float, max_frequency: float, sampling_rate: int
) -> torch.Tensor:
    """Triangular mel filterbank on the HTK mel scale, without area normalization, computed in float32.

    Equal to `torchaudio.functional.melscale_fbanks(..., norm=None, mel_scale="htk")`.

    Returns:
        `torch.Tensor` of shape `(num_frequency_bins, num_mel_filters)`.
    """

    def hz_to_mel(frequency: float) -> float:
        return 2595.0 * math.log10(1.0 + frequency / 700.0)

    fft_frequencies = torch.linspace(0, sampling_rate // 2, num_frequency_bins)
    mel_points = torch.linspace(hz_to_mel(min_frequency), hz_to_mel(max_frequency), num_mel_filters + 2)
    filter_edges = 700.0 * (10.0 ** (mel_points / 2595.0) - 1.0)
    edge_gaps = filter_edges[1:] - filter_edges[:-1]
    distances = filter_edges.unsqueeze(0) - fft_frequencies.unsqueeze(1)  # (bins, num_mel_filters + 2)
    rising = (-1.0 * distances[:, :-2]) / edge_gaps[:-1]
    falling = distances[:, 2:] / edge_gaps[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def read_audio(path: str | os.PathLike | None = None, url: str | None = None) -> tuple[torch.Tensor, int]:
    """
    An audio file, local (`path`) or downloaded (`url`, any scheme `urllib` opens), decoded with soundfile at its own
    rate: a float32 waveform `(channels, samples)` and the rate in Hz. Downmixing and resampling are left to the
    caller (the feature extractor does both as the original does; Transformers' `load_audio` would resample with soxr
    instead, and reads only http(s) URLs).

    Raises a `ValueError` when there is no file at `path`, the download fails or the data is not audio.
    """
    if (path is None) == (url is None):
        raise ValueError("Give exactly one of `path` and `url`.")
    if path is not None:
        source = os.fspath(path)
        if not os.path.isfile(source):
            raise ValueError(f"no audio file at {source!r}.")
        data = source
    else:
        source = url
        try:
            with urllib.request.urlopen(url) as response:
                data = io.BytesIO(response.read())
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot download {url!r} ({error}).") from error
    try:
        array, sampling_rate = sf.read(data, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several error types for unreadable data
        raise ValueError(f"cannot decode {source!r} as audio ({error}).") from error
    return torch.from_numpy(array.T.copy()), int(sampling_rate)
