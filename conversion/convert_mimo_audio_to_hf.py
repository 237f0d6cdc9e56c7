"""Converts an original MiMo-Audio checkpoint (LM, optionally its audio tokenizer) to the Hugging Face layout.

Thin wrapper around `transformers_mimo.convert_mimo_audio_to_hf`; run with `--help` for the options.
"""

from transformers_mimo.convert_mimo_audio_to_hf import main


if __name__ == "__main__":
    main()
