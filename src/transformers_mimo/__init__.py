"""MiMo-Audio for Hugging Face Transformers.

Importing this package registers every configuration, model, feature extractor and processor with the
Transformers Auto factories, so `AutoModel.from_pretrained(...)` and friends work without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioTokenization,
    AutoModelForMultimodalLM,
    AutoModelForTextToWaveform,
    AutoProcessor,
    AutoTokenizer,
    Qwen2Tokenizer,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.pipelines import PIPELINE_REGISTRY

from .audio_utils import htk_mel_filter_bank, resample_waveform
from .configuration_mimo_audio import (
    MiMoAudioConfig,
    MiMoAudioPatchDecoderConfig,
    MiMoAudioPatchEncoderConfig,
    route_original_checkpoints_to_mimo_audio,
)
from .configuration_mimo_audio_tokenizer import MiMoAudioTokenizerConfig
from .conversion_mapping_mimo_audio import ORIGINAL_CHECKPOINT_KEY_MAPPING
from .convert_mimo_audio_tokenizer_to_hf import convert_original_state_dict
from .feature_extraction_mimo_audio import MiMoAudioFeatureExtractor
from .generation_mimo_audio import MiMoAudioGenerateOutput, MiMoAudioStreamer
from .modeling_mimo_audio import (
    MiMoAudioForConditionalGeneration,
    MiMoAudioLogProbs,
    MiMoAudioModel,
    MiMoAudioModelOutputWithPast,
    MiMoAudioOutputWithPast,
    MiMoAudioPreTrainedModel,
    compute_logprobs,
)
from .modeling_mimo_audio_tokenizer import (
    MiMoAudioTokenizerDecoderOutput,
    MiMoAudioTokenizerEncoderOutput,
    MiMoAudioTokenizerModel,
    MiMoAudioTokenizerOutput,
    MiMoAudioTokenizerPreTrainedModel,
    MiMoAudioTokenizerStreamingCache,
    MiMoAudioTokenizerStreamingDecoderOutput,
)
from .pipelines_mimo_audio import MiMoAudioTextToAudioPipeline
from .processing_mimo_audio import MiMoAudioDecodedOutput, MiMoAudioProcessor
from .prompting_mimo_audio import V25_ASR_INSTRUCTIONS, V25_LANGUAGE_TAGS
from .quantization_mimo_audio import QUANTIZATION_SKIP_MODULES, UNQUANTIZED_MODULES
from .training_mimo_audio import LORA_TARGET_MODULES, MiMoAudioDataCollator, get_lora_target_modules
from .transcription_mimo_audio import Transcription, TranscriptionSegment, find_speech_segments, transcribe


__version__ = "0.1.0"

# Audio tokenizer (codec): log-mel -> codes -> waveform.
AutoConfig.register("mimo_audio_tokenizer", MiMoAudioTokenizerConfig, exist_ok=True)
AutoModel.register(MiMoAudioTokenizerConfig, MiMoAudioTokenizerModel, exist_ok=True)
AutoModelForAudioTokenization.register(MiMoAudioTokenizerConfig, MiMoAudioTokenizerModel, exist_ok=True)

# Language model: patch encoder + Qwen2 backbone + patch decoder. `AutoModel` gives the model that generates, as
# Transformers does for csm and higgs_audio_v2.
AutoConfig.register("mimo_audio", MiMoAudioConfig, exist_ok=True)
AutoConfig.register("mimo_audio_patch_encoder", MiMoAudioPatchEncoderConfig, exist_ok=True)
AutoConfig.register("mimo_audio_patch_decoder", MiMoAudioPatchDecoderConfig, exist_ok=True)
AutoModel.register(MiMoAudioConfig, MiMoAudioForConditionalGeneration, exist_ok=True)
AutoModelForTextToWaveform.register(MiMoAudioConfig, MiMoAudioForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(MiMoAudioConfig, MiMoAudioForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(MiMoAudioConfig, tokenizer_class=Qwen2Tokenizer, exist_ok=True)
# Original MiMo-Audio / MiMo-V2.5-ASR directories say `model_type: "qwen2"`: the Auto classes read them as MiMo-Audio.
route_original_checkpoints_to_mimo_audio()
# Original MiMo-Audio checkpoints (flat `model.*`, `speech_embeddings.*`, `local_transformer.*`, ...) load directly.
register_checkpoint_conversion_mapping(
    "MiMoAudioForConditionalGeneration",
    [
        WeightRenaming(source_patterns=source, target_patterns=target)
        for source, target in ORIGINAL_CHECKPOINT_KEY_MAPPING.items()
    ],
    overwrite=True,
)

# Feature extraction (waveform -> log-mel) and the processor (chat messages <-> model inputs, outputs -> text + audio).
AutoFeatureExtractor.register(MiMoAudioTokenizerConfig, MiMoAudioFeatureExtractor, exist_ok=True)
AutoFeatureExtractor.register(MiMoAudioConfig, MiMoAudioFeatureExtractor, exist_ok=True)
AutoProcessor.register(MiMoAudioConfig, MiMoAudioProcessor, exist_ok=True)
# `pipeline("text-to-speech")` / `pipeline("text-to-audio")` build the task's pipeline extended for MiMo-Audio, which
# runs every other model as the stock one does (see pipelines_mimo_audio.py).
PIPELINE_REGISTRY.supported_tasks["text-to-audio"] = {
    **PIPELINE_REGISTRY.supported_tasks["text-to-audio"],
    "impl": MiMoAudioTextToAudioPipeline,
}

__all__ = [
    "LORA_TARGET_MODULES",
    "ORIGINAL_CHECKPOINT_KEY_MAPPING",
    "QUANTIZATION_SKIP_MODULES",
    "UNQUANTIZED_MODULES",
    "V25_ASR_INSTRUCTIONS",
    "V25_LANGUAGE_TAGS",
    "MiMoAudioConfig",
    "MiMoAudioDataCollator",
    "MiMoAudioDecodedOutput",
    "MiMoAudioFeatureExtractor",
    "MiMoAudioForConditionalGeneration",
    "MiMoAudioGenerateOutput",
    "MiMoAudioLogProbs",
    "MiMoAudioModel",
    "MiMoAudioModelOutputWithPast",
    "MiMoAudioOutputWithPast",
    "MiMoAudioPatchDecoderConfig",
    "MiMoAudioPatchEncoderConfig",
    "MiMoAudioPreTrainedModel",
    "MiMoAudioProcessor",
    "MiMoAudioStreamer",
    "MiMoAudioTextToAudioPipeline",
    "MiMoAudioTokenizerConfig",
    "MiMoAudioTokenizerDecoderOutput",
    "MiMoAudioTokenizerEncoderOutput",
    "MiMoAudioTokenizerModel",
    "MiMoAudioTokenizerOutput",
    "MiMoAudioTokenizerPreTrainedModel",
    "MiMoAudioTokenizerStreamingCache",
    "MiMoAudioTokenizerStreamingDecoderOutput",
    "Transcription",
    "TranscriptionSegment",
    "compute_logprobs",
    "convert_original_state_dict",
    "find_speech_segments",
    "get_lora_target_modules",
    "htk_mel_filter_bank",
    "resample_waveform",
    "transcribe",
]


def __getattr__(name):
    # TRL is optional (the `[rl]` extra): its trainer is imported on first use.
    if name == "MiMoAudioGRPOTrainer":
        from .trl_mimo_audio import MiMoAudioGRPOTrainer

        return MiMoAudioGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
