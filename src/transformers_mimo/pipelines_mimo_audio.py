"""
Transformers' `text-to-audio` / `text-to-speech` pipeline for MiMo-Audio.

The stock [`~transformers.TextToAudioPipeline`] expects a text-to-speech model: the processor's `__call__` lays out a
text as the model's input, and `generate` returns the waveform (`audio`) or codes that `processor.decode` turns into
one. MiMo-Audio is a speech-text LM: a text is read aloud only when laid out as a TTS request (`processor.tts`), its
codec lives in the processor, and the speech is the audio channel (`audio_sequences`) of `generate`'s dict output,
which `processor.decode` (the tokenizer's, text only) never receives. This subclass does those three steps the MiMo
way and leaves every other model to the stock pipeline; importing `transformers_mimo` makes
`pipeline("text-to-speech", ...)` build it.
"""

from transformers.pipelines.text_to_audio import AudioOutput, TextToAudioPipeline
from transformers.utils.chat_template_utils import Chat

from .modeling_mimo_audio import MiMoAudioForConditionalGeneration


class MiMoAudioTextToAudioPipeline(TextToAudioPipeline):
    """
    [`~transformers.TextToAudioPipeline`] that also runs MiMo-Audio; other models run exactly as in the stock pipeline.

    For MiMo-Audio (instruct model):
    - a text (or a list of texts) is laid out by `processor.tts`; `processor_kwargs` are that method's keyword
      arguments (`instruction`, `style`, `voice`, `natural_instruction`);
    - a chat is laid out by `processor.apply_chat_template` with a speech answer (`output_modality="audio"`);
      `processor_kwargs` are that method's keyword arguments;
    - generation starts from `processor.generation_kwargs("tts")` (the original's stop tokens and sampling), under the
      call's `forward_params` and `generate_kwargs`;
    - the speech after the prompt is decoded by `processor.batch_decode_generation`: `audio` is a float32 numpy
      waveform `(samples,)` at `sampling_rate` (24 kHz), or `None` when the model generated no speech.

    Example:

    ```python
    >>> import transformers_mimo  # registers MiMo-Audio with Transformers, this pipeline included
    >>> from transformers import pipeline

    >>> tts = pipeline("text-to-speech", model="path/to/converted")
    >>> output = tts("Hello from MiMo-Audio.", generate_kwargs={"max_new_tokens": 512})
    >>> output["audio"].shape, output["sampling_rate"]
    ```
    """

    def _is_mimo_audio(self) -> bool:
        return isinstance(self.model, MiMoAudioForConditionalGeneration)

    def preprocess(self, text, **kwargs):
        if not self._is_mimo_audio():
            return super().preprocess(text, **kwargs)
        processor_kwargs = kwargs.pop("processor_kwargs", None) or {}
        if kwargs:
            raise ValueError(
                f"Unexpected preprocessing arguments for MiMo-Audio: {sorted(kwargs)}; pass the processor's in "
                "`processor_kwargs`."
            )
        if isinstance(text, Chat):
            return self.processor.apply_chat_template(
                text.messages, **{"output_modality": "audio", **processor_kwargs}
            )
        return self.processor.tts(text, **processor_kwargs)

    def _forward(self, model_inputs, **kwargs):
        if not self._is_mimo_audio():
            return super()._forward(model_inputs, **kwargs)
        kwargs["forward_params"] = {**self.processor.generation_kwargs("tts"), **kwargs["forward_params"]}
        prompt_length = model_inputs["input_ids"].shape[1]
        return {"generation": super()._forward(model_inputs, **kwargs), "prompt_length": prompt_length}

    def postprocess(self, audio):
        if not self._is_mimo_audio():
            return super().postprocess(audio)
        decoded = self.processor.batch_decode_generation(audio["generation"], prompt_length=audio["prompt_length"])
        waveforms = [None if waveform is None else waveform.numpy() for waveform in decoded.audio]
        return AudioOutput(audio=waveforms[0] if len(waveforms) == 1 else waveforms, sampling_rate=self.sampling_rate)
