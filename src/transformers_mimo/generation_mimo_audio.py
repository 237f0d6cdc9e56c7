"""Patch-level generation for MiMo-Audio."""

from transformers.generation import GenerationMixin


class MiMoAudioGenerationMixin(GenerationMixin):
    """Generation for `MiMoAudioForConditionalGeneration`: one LLM position per step, plus a 4×C audio patch
    from the patch decoder whenever the text head chooses `<|empty|>`."""
