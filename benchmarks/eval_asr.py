"""Word / character error rate and throughput of MiMo-V2.5-ASR or MiMo-Audio-7B-Instruct on a speech corpus.

    # a folder of audio files, each with its reference in <stem>.txt next to it
    python benchmarks/eval_asr.py --model mimo-v2.5-asr-hf --data my_corpus/ --language en

    # a folder of audio files and a Kaldi-style transcript file ("<stem> <text>" per line, e.g. AISHELL's)
    python benchmarks/eval_asr.py --model mimo-v2.5-asr-hf --data wav/ --references transcript.txt --language zh

    # a Hugging Face `datasets` dataset (Hub name or a `save_to_disk` folder) with an audio and a text column
    python benchmarks/eval_asr.py --model mimo-v2.5-asr-hf --dataset openslr/librispeech_asr --config clean \
        --split test --text-column text --batch-size 16 --device cuda --dtype bfloat16

Every recording goes through `transformers_mimo.transcribe` (recordings longer than `--max-segment-seconds` are cut
at pauses). The error rate is computed with jiwer over the whole corpus (errors summed over utterances, divided by
the reference length), after this normalization of reference and hypothesis alike:

- WER (English): Unicode NFKC, lower case, punctuation removed except apostrophes inside words, whitespace
  collapsed; words are compared.
- CER (Chinese): Unicode NFKC (full-width letters, digits and punctuation become half-width), lower case,
  punctuation and all whitespace removed; characters are compared. No traditional/simplified conversion.

`--metric auto` (the default) picks CER for a corpus whose references hold Chinese characters, else WER. The
normalization is simpler than Whisper's English normalizer (no number or spelling standardization), so WERs may be a
few tenths higher than published ones computed with it; docs/asr.md says how to reproduce Xiaomi's numbers.

Prints a markdown table: utterances, audio seconds, wall seconds of transcription (model loading excluded),
throughput in audio seconds per wall second, and the error rate. `--hypotheses FILE` writes one JSON line per
utterance (id, reference, hypothesis) to a new file.
"""

import argparse
import io
import json
import os
import re
import sys
import time
import unicodedata
from pathlib import Path

import soundfile as sf
import torch


AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"}
_CHINESE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_PUNCTUATION = re.compile(r"[^\w\s']|_")


def normalize_english(text: str) -> str:
    """NFKC, lower case, punctuation removed (apostrophes inside words kept), whitespace collapsed."""
    text = _PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", text).lower())
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())


def normalize_chinese(text: str) -> str:
    """NFKC, lower case, punctuation and whitespace removed (characters are the units)."""
    return "".join(_PUNCTUATION.sub("", unicodedata.normalize("NFKC", text).lower()).split())


def error_rate(references: list[str], hypotheses: list[str], metric: str) -> float:
    """Corpus WER or CER (see the module docstring); utterances whose normalized reference is empty are skipped."""
    import jiwer

    normalize = normalize_chinese if metric == "cer" else normalize_english
    pairs = [(normalize(ref), normalize(hyp)) for ref, hyp in zip(references, hypotheses)]
    pairs = [(ref, hyp) for ref, hyp in pairs if ref]
    if not pairs:
        raise ValueError("No reference holds any word after normalization.")
    references, hypotheses = zip(*pairs)
    if metric == "cer":
        return jiwer.cer(list(references), list(hypotheses))
    return jiwer.wer(list(references), list(hypotheses))


def pick_metric(references: list[str], metric: str) -> str:
    if metric != "auto":
        return metric
    return "cer" if any(_CHINESE.search(text) for text in references) else "wer"


def folder_corpus(folder: Path, references: Path | None) -> list[tuple[str, object, str]]:
    """`(id, audio path, reference)` for every audio file of `folder` (sorted), from `<stem>.txt` or `references`."""
    if not folder.is_dir():
        raise ValueError(f"--data {str(folder)!r} is not a directory.")
    table = {}
    if references is not None:
        for line in references.read_text(encoding="utf-8").splitlines():
            if line.strip():
                key, _, text = line.strip().partition(" ") if "\t" not in line else line.strip().partition("\t")
                table[key] = text.strip()
    corpus = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
        if references is not None:
            if path.stem not in table:
                raise ValueError(f"{path.stem!r} ({path}) has no line in {str(references)!r}.")
            text = table[path.stem]
        else:
            sidecar = path.with_suffix(".txt")
            if not sidecar.is_file():
                raise ValueError(f"{str(path)!r} has no reference {str(sidecar)!r} (or pass --references).")
            text = sidecar.read_text(encoding="utf-8").strip()
        corpus.append((path.stem, str(path), text))
    if not corpus:
        raise ValueError(f"--data {str(folder)!r} holds no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}).")
    return corpus


def dataset_corpus(name: str, config: str | None, split: str, audio_column: str, text_column: str):
    """`(id, (waveform, rate), reference)` for every row of a `datasets` dataset (a `save_to_disk` folder or a
    Hub name). Audio is read with soundfile from the stored bytes or path, so no audio decoding backend is needed."""
    import datasets

    if os.path.isdir(name):
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(name, config, split=split)
    for column in (audio_column, text_column):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no column {column!r}; it has {dataset.column_names}.")
    dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    corpus = []
    for index, row in enumerate(dataset):
        audio = row[audio_column]
        source = audio["bytes"] if audio.get("bytes") else audio["path"]
        array, rate = sf.read(
            source if isinstance(source, str) else io.BytesIO(source), dtype="float32", always_2d=True
        )
        key = Path(audio["path"]).stem if audio.get("path") else str(index)
        corpus.append((key, (torch.from_numpy(array.T.copy()).mean(0), int(rate)), row[text_column]))
    return corpus


def audio_seconds(item) -> float:
    if isinstance(item, tuple):
        return item[0].shape[-1] / item[1]
    return sf.info(item).duration


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="LM checkpoint: converted or original directory, or Hub id")
    parser.add_argument("--audio-tokenizer", default=None, help="codec (default: MODEL/audio_tokenizer)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="folder of audio files with references")
    source.add_argument("--dataset", help="datasets name or save_to_disk folder")
    parser.add_argument("--references", type=Path, default=None, help="Kaldi-style transcript file for --data")
    parser.add_argument("--config", default=None, help="dataset configuration name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--audio-column", default="audio")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N utterances only")
    parser.add_argument("--language", choices=["zh", "en"], default=None, help="MiMo-V2.5-ASR language tag")
    parser.add_argument("--metric", choices=["auto", "wer", "cer"], default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-segment-seconds", type=float, default=30.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    parser.add_argument("--hypotheses", type=Path, default=None, help="write per-utterance results (JSON lines)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max-samples must be positive")
    if args.hypotheses is not None and args.hypotheses.exists():
        parser.error(f"--hypotheses {str(args.hypotheses)!r} already exists")
    return args


def evaluate(args) -> dict:
    from transformers_mimo import MiMoAudioForConditionalGeneration, MiMoAudioProcessor, transcribe

    if args.data is not None:
        corpus = folder_corpus(args.data, args.references)
    else:
        corpus = dataset_corpus(args.dataset, args.config, args.split, args.audio_column, args.text_column)
    corpus = corpus[: args.max_samples]
    metric = pick_metric([reference for _, _, reference in corpus], args.metric)

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = MiMoAudioForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    processor = MiMoAudioProcessor.from_pretrained(
        args.model, audio_tokenizer=args.audio_tokenizer, device=args.device, dtype=dtype
    )
    start = time.perf_counter()
    results = transcribe(
        model,
        processor,
        [audio for _, audio, _ in corpus],
        language=args.language,
        batch_size=args.batch_size,
        max_segment_seconds=args.max_segment_seconds,
        max_new_tokens=args.max_new_tokens,
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    hypotheses = [result.text for result in results]
    seconds = sum(result.duration for result in results)
    summary = {
        "utterances": len(corpus),
        "audio_seconds": seconds,
        "wall_seconds": wall,
        "throughput": seconds / wall,
        "metric": metric,
        "error_rate": error_rate([reference for _, _, reference in corpus], hypotheses, metric),
    }
    if args.hypotheses is not None:
        lines = [
            json.dumps({"id": key, "reference": reference, "hypothesis": hypothesis}, ensure_ascii=False)
            for (key, _, reference), hypothesis in zip(corpus, hypotheses)
        ]
        with open(args.hypotheses, "x", encoding="utf-8") as handle:  # "x": never over an existing file
            handle.write("\n".join(lines) + "\n")
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        summary = evaluate(args)
    except ValueError as error:
        print(f"eval_asr: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"| utterances | audio s | wall s | audio s / wall s | {summary['metric'].upper()} |")
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {summary['utterances']} | {summary['audio_seconds']:.1f} | {summary['wall_seconds']:.1f} | "
        f"{summary['throughput']:.2f} | {100 * summary['error_rate']:.2f}% |"
    )
    return summary


if __name__ == "__main__":
    main()
