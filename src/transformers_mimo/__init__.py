"""MiMo-Audio for Hugging Face Transformers.

Importing this package registers every configuration, model, feature extractor and processor with the
Transformers Auto factories, so `AutoModel.from_pretrained(...)` and friends work without `trust_remote_code`.
"""

__version__ = "0.1.0"
