"""`python conversion/convert_mimo_audio_to_hf.py ARGS` = `mimo-audio convert lm ARGS` (see docs/conversion.md)."""

from transformers_mimo.convert_mimo_audio_to_hf import main


if __name__ == "__main__":
    main()
