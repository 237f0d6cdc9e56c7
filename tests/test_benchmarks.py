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
        encoder=bench_generate.patch_config(16, 32, 1, 2),
        decoder=bench_generate.patch_config(16, 32, 2, 2),
        vocab_size=64,
    )


def test_throughput_forces_an_audio_patch_at_every_step(bench_generate):
    model = _tiny_model(bench_generate)
    results = bench_generate.throughput(model, [1, 2], 6, 2, 2, cache_implementation="static")
    assert list(results) == [1, 2]
    config = model.config
    empty_ids = torch.tensor(config.audio_empty_ids)
    for batch_size, (prefill, per_step, rate, codes) in results.items():
        assert prefill > 0 and per_step > 0 and rate == pytest.approx(batch_size / per_step)
        # 3 generated positions (2 timed + 1), each a real patch: no codebook holds its empty id.
        assert codes.shape == (batch_size, 3, config.group_size, config.audio_channels)
        assert ((codes >= 0) & (codes < empty_ids)).all()


def test_real_width_times_on_a_tiny_model(bench_generate):
    model = _tiny_model(bench_generate)
    with torch.no_grad():
        head_real = torch.nn.Linear(model.config.text_config.hidden_size, 16, bias=False)
        layer, head, llm, patch, layers = bench_generate.real_width_times(model, head_real, context=5, repeats=1)
    assert min(layer, head, llm, patch, layers) > 0 and layers <= patch
    # the extrapolation adds 35 more layers and the real vocabulary's head to the measured step
    assert llm > 35 * layer + head


def test_weight_reads_counts_every_patch_decoder_step(bench_generate):
    model = _tiny_model(bench_generate)
    config, decoder = model.config, model.patch_decoder
    patch_reads, llm_reads = bench_generate.weight_reads(model)
    layer_params = sum(p.numel() for p in decoder.layers[0].parameters())
    assert layer_params == 4 * 16 * 16 + 3 * 16 + 3 * 16 * 32 + 2 * 16  # q/k/v/o (q/k/v biases), MLP, 2 norms
    assert patch_reads > config.patch_decoder_steps * 2 * layer_params
    text_layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert llm_reads > 2 * text_layer + model.lm_head.weight.numel()


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
