"""The benchmark scripts run against the current API (CI never times them; this runs their pieces on tiny configs)."""

import importlib.util
from pathlib import Path

import pytest
import torch


BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_generate():
    spec = importlib.util.spec_from_file_location("bench_generate", BENCHMARKS / "bench_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_model(bench_generate):
    return bench_generate.build_model(
        text={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
        },
        encoder={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        decoder={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
        vocab_size=64,
    )


def test_throughput_forces_an_audio_patch_at_every_step(bench_generate):
    model = _tiny_model(bench_generate)
    results = bench_generate.throughput(model, [1, 2], 6, 2, 2, mode="eager")
    assert list(results) == [1, 2]
    config = model.config
    empty_ids = torch.tensor(config.audio_empty_ids)
    for batch_size, (first, prefill, per_step, rate, codes) in results.items():
        assert first > 0 and prefill > 0 and per_step > 0 and rate == pytest.approx(batch_size / per_step)
        # 3 generated positions (2 timed + 1), each a real patch: no codebook holds its empty id.
        assert codes.shape == (batch_size, 3, config.group_size, config.audio_channels)
        assert ((codes >= 0) & (codes < empty_ids)).all()


def test_generation_memory_traces_every_step(bench_generate):
    model = _tiny_model(bench_generate)
    peak, early, late = bench_generate.generation_memory(model, batch_size=2, positions=240, mode="eager")
    assert peak >= 0
    # 120 generated steps of a model this small: no per-step growth of a megabyte
    assert abs(early) < 2**20 and abs(late) < 2**20
    trace = bench_generate.MemoryTrace(model.device)
    bench_generate.forced_audio_generate(model, bench_generate.random_prompt(model, 1, 4), 3, "eager", streamer=trace)
    assert len(trace.samples) == 3 and min(trace.samples) > 0


def test_rollout_times_on_a_tiny_model(bench_generate):
    """bench_rollouts.py's timing loop on a tiny config: both workloads generate what they claim (checked inside) and
    every time is positive."""
    spec = importlib.util.spec_from_file_location("bench_rollouts", BENCHMARKS / "bench_rollouts.py")
    bench_rollouts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_rollouts)
    model = _tiny_model(bench_generate)
    for workload in ("speech", "text"):
        results = bench_rollouts.rollout_times(model, [1, 3], 6, 3, workload, 1, torch.device("cpu"))
        assert list(results) == [1, 3]
        assert all(generate > 0 and score > 0 for generate, score in results.values())
