"""Transformers' ModelTesterMixin on MiMoAudioModel / MiMoAudioForConditionalGeneration and MiMoAudioTokenizerModel,
written the way the in-tree csm / mimi tests are. Run by `run.sh` inside a copy of the transformers test suite."""

import unittest
import unittest.mock

import torch

from transformers_mimo import (
    MiMoAudioConfig,
    MiMoAudioForConditionalGeneration,
    MiMoAudioModel,
    MiMoAudioTokenizerConfig,
    MiMoAudioTokenizerModel,
)

from ... import test_modeling_common
from ...generation.test_utils import GenerationTesterMixin
from ...test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor
from . import GOLDEN


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
