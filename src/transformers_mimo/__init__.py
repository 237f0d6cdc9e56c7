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

# --- language model: patch encoder + Qwen2 backbone + patch decoder ---
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMultimodalLM,
    AutoModelForTextToWaveform,
    AutoTokenizer,
    Qwen2Tokenizer,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from .configuration_mimo_audio import MiMoAudioConfig, MiMoAudioPatchDecoderConfig, MiMoAudioPatchEncoderConfig
from .modeling_mimo_audio import (
    ORIGINAL_CHECKPOINT_KEY_MAPPING,
    MiMoAudioForConditionalGeneration,
    MiMoAudioModel,
    MiMoAudioOutputWithPast,
    MiMoAudioPreTrainedModel,
)


AutoConfig.register("mimo_audio", MiMoAudioConfig, exist_ok=True)
AutoConfig.register("mimo_audio_patch_encoder", MiMoAudioPatchEncoderConfig, exist_ok=True)
AutoConfig.register("mimo_audio_patch_decoder", MiMoAudioPatchDecoderConfig, exist_ok=True)
AutoModel.register(MiMoAudioConfig, MiMoAudioForConditionalGeneration, exist_ok=True)
AutoModelForTextToWaveform.register(MiMoAudioConfig, MiMoAudioForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(MiMoAudioConfig, MiMoAudioForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(MiMoAudioConfig, tokenizer_class=Qwen2Tokenizer, exist_ok=True)
# Original MiMo-Audio checkpoints (flat `model.*`, `speech_embeddings.*`, `local_transformer.*`, ...) load directly.
register_checkpoint_conversion_mapping(
    "MiMoAudioForConditionalGeneration",
    [
        WeightRenaming(source_patterns=source, target_patterns=target)
        for source, target in ORIGINAL_CHECKPOINT_KEY_MAPPING.items()
    ],
    overwrite=True,
)

# --- patch-level generation: generate() output and streamer ---
from .generation_mimo_audio import MiMoAudioGenerateOutput, MiMoAudioStreamer

# --- feature extraction (waveform -> log-mel) and audio helpers ---
from transformers import AutoFeatureExtractor

from .audio_utils import htk_mel_filter_bank, resample_waveform
from .configuration_mimo_audio import MiMoAudioConfig
from .configuration_mimo_audio_tokenizer import MiMoAudioTokenizerConfig
from .feature_extraction_mimo_audio import MiMoAudioFeatureExtractor


AutoFeatureExtractor.register(MiMoAudioTokenizerConfig, MiMoAudioFeatureExtractor, exist_ok=True)
AutoFeatureExtractor.register(MiMoAudioConfig, MiMoAudioFeatureExtractor, exist_ok=True)

# --- processor (chat messages <-> model inputs, generated ids -> text + waveform) ---
from transformers import AutoProcessor

from .configuration_mimo_audio import MiMoAudioConfig
from .processing_mimo_audio import MiMoAudioDecodedOutput, MiMoAudioProcessor


AutoProcessor.register(MiMoAudioConfig, MiMoAudioProcessor, exist_ok=True)

# --- fine-tuning and RL: quantization defaults, LoRA presets, SFT collator, log-probabilities ---
from .training_mimo_audio import (
    LORA_TARGET_MODULES,
    QUANTIZATION_SKIP_MODULES,
    UNQUANTIZED_MODULES,
    MiMoAudioDataCollator,
    MiMoAudioLogProbs,
    compute_logprobs,
    get_lora_target_modules,
)
