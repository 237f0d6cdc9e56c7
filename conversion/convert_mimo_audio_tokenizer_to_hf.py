"""Convert an original MiMo-Audio-Tokenizer checkpoint into a Hugging Face directory.

python conversion/convert_mimo_audio_tokenizer_to_hf.py --input_dir ORIGINAL --output_dir OUT \
    [--dtype float32|bfloat16|float16] [--force] [--verify]

The logic lives in `transformers_mimo.convert_mimo_audio_tokenizer_to_hf`.
"""

from transformers_mimo.convert_mimo_audio_tokenizer_to_hf import main


if __name__ == "__main__":
    main()
