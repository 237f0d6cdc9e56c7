"""The README's quick start runs as written against a tiny converted checkpoint (lm_a + tok_a of the goldens), with
only the checkpoint path, the device, the input file and the generation length substituted."""

import re
from pathlib import Path

import soundfile as sf
import torch
from conftest import AUDIO, GOLDEN

from transformers_mimo.convert_mimo_audio_to_hf import convert


README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]


def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    checkpoint = convert(
        GOLDEN / "lm_a" / "checkpoint", tmp_path / "hf", tokenizer_dir=GOLDEN / "tok_a" / "checkpoint"
    )
    code = _quick_start()
    substitutions = {
        '"mimo-audio-hf"': repr(str(checkpoint)),
        '"cuda"': '"cpu"',
        '"speech.wav"': repr(str(AUDIO / "prompt_speech_en_w.wav")),
        "max_new_tokens=1024": "max_new_tokens=24",
    }
    for old, new in substitutions.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # the TTS samples
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    processor, inputs, out = namespace["processor"], namespace["inputs"], namespace["out"]
    # The last request was ASR: its transcript is printed, and it stopped at an ASR stop id or ran 256 positions.
    transcript = processor.batch_decode_generation(out, prompt_length=inputs["input_ids"].shape[1]).text[0]
    assert capsys.readouterr().out == transcript + "\n"
    generated = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    stops = processor.generation_kwargs("asr")["eos_token_id"]
    assert len(generated) == 256 or generated[-1] in stops
    info = sf.info(tmp_path / "day.wav")
    assert info.samplerate == 24000 and info.frames > 0 and info.frames % 960 == 0  # whole 25 Hz codec frames
