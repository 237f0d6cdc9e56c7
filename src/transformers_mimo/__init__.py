"""MiMo-Audio for Hugging Face Transformers.

Importing this package registers every configuration, model, feature extractor and processor with the
Transformers Auto factories, so `AutoModel.from_pretrained(...)` and friends work without `trust_remote_code`.
"""

__version__ = "0.1.0"

# --- audio tokenizer (codec): log-mel -> codes -> waveform ---
from transformers import AutoConfig, AutoModel, AutoModelForAudioTokenization

from .configuration_mimo_audio_tokenizer import MiMoAudioTokenizerConfig
from .modeling_mimo_audio_tokenizer import (
    MiMoAudioTokenizerDecoderOutput,
    MiMoAudioTokenizerEncoderOutput,
    MiMoAudioTokenizerModel,
    MiMoAudioTokenizerOutput,
    MiMoAudioTokenizerPreTrainedModel,
    MiMoAudioTokenizerStreamingCache,
    MiMoAudioTokenizerStreamingDecoderOutput,
    convert_original_state_dict,
)


AutoConfig.register("mimo_audio_tokenizer", MiMoAudioTokenizerConfig, exist_ok=True)
AutoModel.register(MiMoAudioTokenizerConfig, MiMoAudioTokenizerModel, exist_ok=True)
AutoModelForAudioTokenization.register(MiMoAudioTokenizerConfig, MiMoAudioTokenizerModel, exist_ok=True)
