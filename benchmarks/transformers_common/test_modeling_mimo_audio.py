"""Transformers' ModelTesterMixin and GenerationTesterMixin on MiMoAudioModel / MiMoAudioForConditionalGeneration and
ModelTesterMixin on MiMoAudioTokenizerModel, written the way the in-tree csm / dia / higgs_audio_v2 / mimi tests are.
Run by `run.sh` inside a copy of the transformers test suite (GenerationTesterMixin only with GENERATION_TEST_UTILS)."""

import functools
import unittest
import unittest.mock

import pytest
import torch
from transformers import PreTrainedModel

from transformers_mimo import (
    MiMoAudioConfig,
    MiMoAudioForConditionalGeneration,
    MiMoAudioModel,
    MiMoAudioPreTrainedModel,
    MiMoAudioTokenizerConfig,
    MiMoAudioTokenizerModel,
)

from ... import test_modeling_common
from ...generation.test_utils import GenerationTesterMixin
from ...test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
from . import GOLDEN


if not hasattr(PreTrainedModel, "_is_stateful"):
    # A tests/generation/test_utils.py of an earlier release than the installed transformers still reads this class
    # flag (removed since); False is what it was for every model without recurrent state.
    PreTrainedModel._is_stateful = False


# Without GENERATION_TEST_UTILS, run.sh stubs the mixin: its tests that are overridden here do not run either.
needs_generation_tester_mixin = unittest.skipUnless(
    hasattr(GenerationTesterMixin, "test_greedy_generate"),
    "GenerationTesterMixin is stubbed (no GENERATION_TEST_UTILS)",
)


class MiMoAudioModelTester:
    def __init__(self, parent, batch_size=3, seq_length=7, audio_positions=3):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.audio_positions = audio_positions
        self.is_training = True
        config = self.get_config()
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.hidden_size = config.text_config.hidden_size
        self.num_attention_heads = config.text_config.num_attention_heads
        self.vocab_size = config.text_config.vocab_size
        # `output_hidden_states` adds the backbone's and the patch encoder's (`patch_encoder_hidden_states`).
        self.num_hidden_states_types = 2
        self.empty_token_id = config.empty_token_id

    def get_config(self):
        config = MiMoAudioConfig.from_pretrained(f"{GOLDEN}/lm_b/checkpoint")
        config.text_config.num_hidden_layers = 2
        config.text_config.layer_types = config.text_config.layer_types[:2]
        config.pad_token_id = config.text_config.pad_token_id = 0
        # a conversation starts at `<|im_start|>`; without a BOS id the mixin skips test_generate_without_input_ids
        config.text_config.bos_token_id = config.im_start_token_id
        return config

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], 400)  # text ids below the special tokens
        audio_input_ids = torch.stack(
            [
                ids_tensor([self.batch_size, self.seq_length, config.group_size], size)
                for size in config.audio_vocab_sizes
            ],
            dim=-1,
        )
        attention_mask = torch.ones(self.batch_size, self.seq_length, dtype=torch.long)
        return config, {"input_ids": input_ids, "audio_input_ids": audio_input_ids, "attention_mask": attention_mask}


class MiMoAudioModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (MiMoAudioModel, MiMoAudioForConditionalGeneration)
    test_resize_embeddings = False
    _is_composite = True

    def setUp(self):
        self.model_tester = MiMoAudioModelTester(self)

    @staticmethod
    def _base_model_listed():
        """The training tests leave out base models (no loss) by their entry in the in-tree `MODEL_MAPPING_NAMES`,
        which a class registered from outside Transformers cannot have: list `MiMoAudioModel` there for them."""
        base_models = {**test_modeling_common.MODEL_MAPPING_NAMES, "mimo_audio": MiMoAudioModel.__name__}
        return unittest.mock.patch.object(test_modeling_common, "MODEL_MAPPING_NAMES", base_models)

    def test_training(self):
        with self._base_model_listed():
            super().test_training()

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        with self._base_model_listed():
            super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels and model_class is MiMoAudioForConditionalGeneration:
            # a training sample ends with speech (`<|empty|>` in the text channel), so that every weight gets a
            # gradient: the patch encoder reads the audio positions, the patch decoder predicts their patches
            inputs_dict["input_ids"][:, -self.model_tester.audio_positions :] = self.model_tester.empty_token_id
            inputs_dict["labels"] = inputs_dict["input_ids"].clone()
            inputs_dict["audio_labels"] = inputs_dict["audio_input_ids"].clone()
        return inputs_dict

    def test_reverse_loading_mapping(self):
        """The mixin's test, saving with `save_original_format=True`: the registered mapping translates the original
        release's keys, and saving with it must write them back. Without it this package saves its own layout (see
        docs/architecture.md, "Transformers conformance", for why it does not follow Transformers' default here).
        The tester's patch decoder is as wide as the audio embeddings, so it lacks `patch_decoder.embeddings_proj`, the
        target of one rule: here it is twice as wide."""
        get_config = self.model_tester.get_config

        def get_config_with_embeddings_proj():
            config = get_config()
            config.patch_decoder_config.hidden_size *= 2
            return config

        save_original = functools.partialmethod(MiMoAudioPreTrainedModel.save_pretrained, save_original_format=True)
        with (
            unittest.mock.patch.object(MiMoAudioPreTrainedModel, "save_pretrained", save_original),
            unittest.mock.patch.object(self.model_tester, "get_config", get_config_with_embeddings_proj),
        ):
            super().test_reverse_loading_mapping()

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support assisted decoding")
    def test_assisted_decoding_matches_greedy_search_0_random(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support assisted decoding")
    def test_assisted_decoding_matches_greedy_search_1_same(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support assisted decoding")
    def test_assisted_decoding_sample(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support prompt lookup decoding")
    def test_prompt_lookup_decoding_matches_greedy_search(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support beam search")
    def test_beam_sample_generate(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support beam search")
    def test_beam_search_generate(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support beam search")
    def test_beam_search_generate_dict_output(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support beam search")
    def test_beam_search_generate_dict_outputs_use_cache(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support beam search")
    def test_beam_sample_generate_dict_output(self):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support beam search")
    def test_generate_from_inputs_embeds_1_beam_search(self, _, num_beams):
        pass

    @unittest.skip(reason="as CSM and HiggsAudioV2: MiMo-Audio does not support beam search")
    def test_model_parallel_beam_search(self):
        pass

    @needs_generation_tester_mixin
    def test_left_padding_compatibility(self):
        """The mixin's test, with the audio channel padded alongside `input_ids` (each codebook's empty id), through
        the mixin's `padded_custom_inputs`."""
        config, inputs_dict = self.prepare_config_and_inputs_for_generate()
        audio_input_ids = inputs_dict["audio_input_ids"]
        empty_ids = torch.tensor(config.audio_empty_ids, dtype=audio_input_ids.dtype)
        padding = empty_ids.expand(audio_input_ids.shape[0], 32, config.group_size, config.audio_channels)
        super().test_left_padding_compatibility(
            padded_custom_inputs={"audio_input_ids": torch.cat((padding, audio_input_ids), dim=1)}
        )

    @needs_generation_tester_mixin
    @pytest.mark.generate
    def test_generate_continue_from_past_key_values(self):
        """As HiggsAudioV2's override of the mixin's test: continuing from a `generate` call's cache carries its
        `audio_sequences` as `audio_input_ids` along with `sequences` as `input_ids`. 3 + 1 new positions equal 4."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = model_class(config).eval()
            generate_kwargs = {
                "pad_token_id": -1,
                "eos_token_id": -1,
                "use_cache": True,
                "do_sample": False,
                "return_dict_in_generate": True,
                "output_scores": True,
            }
            outputs = model.generate(**inputs, **generate_kwargs, max_new_tokens=4)
            first = model.generate(**inputs, **generate_kwargs, max_new_tokens=3)
            continued = model.generate(
                input_ids=first.sequences,
                audio_input_ids=first.audio_sequences,
                attention_mask=torch.nn.functional.pad(
                    inputs["attention_mask"],
                    (0, first.sequences.shape[1] - inputs["attention_mask"].shape[1]),
                    value=1,
                ),
                cache=first.cache,
                **generate_kwargs,
                max_new_tokens=1,
            )
            self.assertIs(continued.cache, first.cache)  # continued in the given cache, not recomputed
            torch.testing.assert_close(continued.sequences, outputs.sequences, rtol=0, atol=0)
            torch.testing.assert_close(continued.audio_sequences, outputs.audio_sequences, rtol=0, atol=0)
            for scores, continued_scores in zip(outputs.scores, first.scores + continued.scores):
                torch.testing.assert_close(continued_scores, scores, rtol=1e-5, atol=1e-5)


class MiMoAudioTokenizerModelTester:
    def __init__(self, parent, batch_size=2, num_frames=64):
        self.parent = parent
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.is_training = False

    def get_config(self):
        return MiMoAudioTokenizerConfig.from_pretrained(f"{GOLDEN}/tok_b/checkpoint")

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        return config, {"input_features": floats_tensor([self.batch_size, config.n_mels, self.num_frames])}


class MiMoAudioTokenizerModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MiMoAudioTokenizerModel,)
    test_resize_embeddings = False
    has_attentions = False

    def setUp(self):
        self.model_tester = MiMoAudioTokenizerModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # as MimiModelTest: the codec does not return hidden states or attentions
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        inputs_dict.pop("output_attentions", None)
        inputs_dict.pop("output_hidden_states", None)
        return inputs_dict

    @unittest.skip(reason="as MimiModel: no `inputs_embeds` logic")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="as MimiModel: no `inputs_embeds` logic")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="as MimiModel: no usual `attention` logic")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="as MimiModel: no usual `attention` logic")
    def test_attention_outputs(self):
        pass

    @unittest.skip(reason="as MimiModel: no usual `hidden_states` logic")
    def test_hidden_states_output(self):
        pass

    def test_model_outputs_equivalence(self):
        """As MimiModelTest's: the tuple output (`return_dict=False`) equals the dict output."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            with torch.no_grad():
                tuple_output = model(**inputs_dict, return_dict=False)
                dict_output = model(**inputs_dict, return_dict=True)
            self.assertIsInstance(tuple_output, tuple)
            for tuple_value, dict_value in zip(tuple_output, dict_output.values()):
                torch.testing.assert_close(tuple_value, dict_value)
