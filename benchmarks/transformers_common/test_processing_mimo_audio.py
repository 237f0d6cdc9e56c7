"""Transformers' ProcessorTesterMixin on MiMoAudioProcessor. Run by `run.sh` inside a copy of the transformers tests."""

import unittest

from transformers import AutoTokenizer

from transformers_mimo import MiMoAudioProcessor, MiMoAudioTokenizerModel
from transformers_mimo.feature_extraction_mimo_audio import MiMoAudioFeatureExtractor

from ...test_processing_common import ProcessorTesterMixin
from . import GOLDEN


class MiMoAudioProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = MiMoAudioProcessor
    audio_input_name = "audio_input_ids"  # the processor returns codes, not features

    @classmethod
    def _codec(cls):
        return MiMoAudioTokenizerModel.from_pretrained(f"{GOLDEN}/tok_b/checkpoint")

    @classmethod
    def _setup_tokenizer(cls):
        return AutoTokenizer.from_pretrained(f"{GOLDEN}/lm_b/checkpoint")

    @classmethod
    def _setup_feature_extractor(cls):
        return MiMoAudioFeatureExtractor.from_audio_tokenizer_config(cls._codec().config)

    @classmethod
    def _setup_from_components(cls):
        # `audio_tokenizer` is not a processor "attribute" in Transformers (dia, higgs_audio_v2): pass it explicitly
        return cls.processor_class(
            cls._setup_feature_extractor(),
            cls._setup_tokenizer(),
            audio_tokenizer=cls._codec(),
            **cls.prepare_processor_dict(),
        )

    def prepare_components(self, **kwargs):
        # the mixin's components are the processor "attributes"; the codec that encodes waveforms is not one (above)
        return {**super().prepare_components(**kwargs), "audio_tokenizer": self._codec()}

    @staticmethod
    def prepare_processor_dict():
        return {"audio_empty_ids": [32, 32, 8, 8, 8, 8, 8, 8]}
