from pathlib import Path


GOLDEN = str(Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "golden")
