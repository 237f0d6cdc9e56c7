"""Feature extractor for the MiMo-Audio tokenizer: waveform -> natural-log mel spectrogram."""

import numpy as np
import torch
from transformers.audio_utils import AudioInput, make_list_of_audio
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import TensorType, logging

from .audio_utils import htk_mel_filter_bank, resample_waveform


logger = logging.get_logger(__name__)

__all__ = ["MiMoAudioFeatureExtractor"]


class MiMoAudioFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns mono (or multichannel, downmixed) waveforms into the log-mel features read by `MiMoAudioTokenizerModel`.

    Each clip is downmixed to mono (mean over channels), resampled to `sampling_rate` when it has another rate, and
    transformed with a centered, reflect-padded STFT (periodic Hann window), magnitude (power 1), an HTK mel
    filterbank without normalization and `log(max(mel, 1e-7))`. This equals the original MiMo-Audio pipeline
    (torchaudio `MelSpectrogram(power=1.0, center=True)` followed by `log(clip(., 1e-7))`): the same float32 ops,
    so on one machine both give the same values. Between CPUs, MKL's FFT code path (AVX2, AVX-512, ...) moves quiet
    high-frequency bins by up to ~1e-3 in log (float32 rounding relative to the frame's loudest bin).

    Every clip is processed on its own and then right-padded, so a clip in a batch gets exactly the features it gets
    alone.

    Args:
        n_mels (`int`, *optional*, defaults to 128):
            Number of mel bins (the tokenizer config's `n_mels`). Also stored as `feature_size`.
        sampling_rate (`int`, *optional*, defaults to 24000):
            Rate in Hz the features are computed at; other input rates are resampled to it.
        n_fft (`int`, *optional*, defaults to 960):
            FFT size; there are `n_fft // 2 + 1` frequency bins.
        hop_length (`int`, *optional*, defaults to 240):
            Samples between frames. A clip of `n` samples gives `n // hop_length + 1` frames.
        win_length (`int`, *optional*, defaults to 960):
            Hann window length, at most `n_fft`.
        fmin (`float`, *optional*, defaults to 0.0):
            Lowest mel filter edge in Hz.
        fmax (`float`, *optional*):
            Highest mel filter edge in Hz; `None` means `sampling_rate // 2`.
        padding_value (`float`, *optional*, defaults to 0.0):
            Value of the padded frames of `input_features`.
    """

    model_input_names = ["input_features", "input_features_mask"]
    log_floor = 1e-7

    def __init__(
        self,
        n_mels: int = 128,
        sampling_rate: int = 24000,
        n_fft: int = 960,
        hop_length: int = 240,
        win_length: int = 960,
        fmin: float = 0.0,
        fmax: float | None = None,
        padding_value: float = 0.0,
        **kwargs,
    ):
        feature_size = kwargs.pop("feature_size", n_mels)
        if feature_size != n_mels:
            raise ValueError(f"`feature_size` ({feature_size}) must equal `n_mels` ({n_mels}).")
        super().__init__(feature_size=n_mels, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.n_mels = n_mels
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.fmin = fmin
        self.fmax = fmax
        self._validate()

    def _validate(self):
        for name in ("n_mels", "sampling_rate", "n_fft", "hop_length", "win_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name, value in (("fmin", self.fmin), ("fmax", 0.0 if self.fmax is None else self.fmax)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"`{name}` must be a number of Hz, got {value!r}.")
        if self.win_length > self.n_fft:
            raise ValueError(f"`win_length` ({self.win_length}) must not exceed `n_fft` ({self.n_fft}).")
        if not 0 <= self.fmin < self.max_frequency <= self.sampling_rate / 2:
            raise ValueError(
                f"Need 0 <= fmin < fmax <= sampling_rate / 2, got fmin={self.fmin}, fmax={self.max_frequency}, "
                f"sampling_rate={self.sampling_rate}."
            )
        if self.padding_side != "right":
            raise ValueError(f"{type(self).__name__} only pads on the right, got padding_side={self.padding_side!r}.")

    @classmethod
    def from_audio_tokenizer_config(cls, config) -> "MiMoAudioFeatureExtractor":
        """The log-mel settings a codec was trained with, from its [`MiMoAudioTokenizerConfig`]."""
        return cls(
            n_mels=config.n_mels,
            sampling_rate=config.sampling_rate,
            n_fft=config.nfft,
            hop_length=config.hop_length,
            win_length=config.window_size,
            fmin=config.fmin,
            fmax=config.fmax,
        )

    @property
    def max_frequency(self) -> float:
        """Highest mel filter edge in Hz (`fmax`, or the Nyquist frequency `sampling_rate // 2` when unset)."""
        return float(self.sampling_rate // 2) if self.fmax is None else float(self.fmax)

    def __call__(
        self,
        audio: AudioInput,
        sampling_rate: int | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Compute log-mel features for one clip or a batch of clips.

        Args:
            audio (`np.ndarray`, `torch.Tensor`, `list[float]`, or a list of those):
                One clip or a list of clips. A clip is a float waveform in [-1, 1] of shape `(samples,)` or
                `(channels, samples)` (downmixed by averaging the channels). A 2-d array is one multichannel clip,
                never a batch: pass a list for a batch.
            sampling_rate (`int`, *optional*):
                Rate of `audio` in Hz; clips at another rate than `self.sampling_rate` are resampled. Strongly
                recommended: when omitted, the audio is assumed to be at `self.sampling_rate` (with a warning).
            return_tensors (`str` or [`~utils.TensorType`], *optional*):
                `"pt"` for torch tensors, `"np"` for numpy arrays; `None` keeps torch tensors.

        Returns:
            [`BatchFeature`] with
            - **input_features** (`(batch, n_mels, frames)`, float32): log-mel features, right-padded with
              `padding_value`.
            - **input_features_mask** (`(batch, frames)`, int32): 1 for real frames, 0 for padding.
        """
        unused = sorted(key for key, value in kwargs.items() if value is not None)
        if unused:
            raise ValueError(f"{type(self).__name__}.__call__ got unexpected arguments: {unused}.")
        if sampling_rate is None:
            logger.warning(
                f"It is strongly recommended to pass the `sampling_rate` argument to `{type(self).__name__}()`. "
                f"Assuming the audio is at {self.sampling_rate} Hz; a wrong rate gives silently wrong features."
            )
            sampling_rate = self.sampling_rate

        clips = self._to_mono_clips(audio)
        clips = [resample_waveform(clip, sampling_rate, self.sampling_rate) for clip in clips]
        features = [self._log_mel(clip, index) for index, clip in enumerate(clips)]

        max_frames = max(feature.shape[-1] for feature in features)
        input_features = torch.full((len(features), self.n_mels, max_frames), float(self.padding_value))
        input_features_mask = torch.zeros((len(features), max_frames), dtype=torch.int32)
        for index, feature in enumerate(features):
            input_features[index, :, : feature.shape[-1]] = feature
            input_features_mask[index, : feature.shape[-1]] = 1
        return BatchFeature(
            {"input_features": input_features, "input_features_mask": input_features_mask}, tensor_type=return_tensors
        )

    def _to_mono_clips(self, audio: AudioInput) -> list[torch.Tensor]:
        """Validate the input and return a list of mono float32 clips `(samples,)`."""
        if isinstance(audio, (list, tuple)) and len(audio) == 0:
            raise ValueError("`audio` is empty: expected a waveform or a non-empty list of waveforms.")
        try:
            items = make_list_of_audio(audio)
        except (ValueError, IndexError, TypeError) as error:
            raise ValueError(
                "`audio` must be a waveform (numpy array, torch tensor or list of floats) or a list of waveforms, "
                f"got {type(audio).__name__}."
            ) from error

        clips = []
        for index, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                if item.is_complex() or not item.is_floating_point():
                    raise ValueError(
                        f"Audio item {index} has dtype {item.dtype}; expected a real float waveform in [-1, 1] "
                        "(convert integer PCM first, e.g. int16 / 32768)."
                    )
                clip = item.detach().to(device="cpu", dtype=torch.float32)
            else:
                array = np.asarray(item)
                if array.dtype.kind != "f":
                    raise ValueError(
                        f"Audio item {index} has dtype {array.dtype}; expected a real float waveform in [-1, 1] "
                        "(convert integer PCM first, e.g. int16 / 32768)."
                    )
                clip = torch.from_numpy(array.astype(np.float32))
            if clip.ndim not in (1, 2):
                raise ValueError(
                    f"Audio item {index} has shape {tuple(clip.shape)}; expected (samples,) or (channels, samples). "
                    "Pass a list of clips for a batch."
                )
            if clip.ndim == 2:
                if clip.shape[0] > clip.shape[1]:
                    raise ValueError(
                        f"Audio item {index} has shape {tuple(clip.shape)}, which looks like (samples, channels); "
                        "expected (channels, samples) (transpose it, e.g. `soundfile.read(...)[0].T`)."
                    )
                clip = clip.mean(dim=0)
            if clip.numel() == 0:
                raise ValueError(f"Audio item {index} is empty (0 samples).")
            if not torch.isfinite(clip).all():
                raise ValueError(f"Audio item {index} contains NaN or infinite samples.")
            clips.append(clip)
        return clips

    def _log_mel(self, waveform: torch.Tensor, index: int) -> torch.Tensor:
        """Log-mel features `(n_mels, frames)` of one mono clip `(samples,)` at `self.sampling_rate`."""
        min_samples = self.n_fft // 2 + 1  # reflect padding by n_fft // 2 needs more samples than that
        if waveform.shape[-1] < min_samples:
            raise ValueError(
                f"Audio item {index} has {waveform.shape[-1]} samples at {self.sampling_rate} Hz; at least "
                f"{min_samples} are needed (n_fft // 2 + 1)."
            )
        stft = torch.stft(
            waveform,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=torch.hann_window(self.win_length),
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        filters = htk_mel_filter_bank(
            self.n_fft // 2 + 1, self.n_mels, float(self.fmin), self.max_frequency, self.sampling_rate
        )
        mel = torch.matmul(stft.abs().transpose(-1, -2), filters).transpose(-1, -2)
        return torch.log(torch.clamp(mel, min=self.log_floor))
