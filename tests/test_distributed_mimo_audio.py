"""Multi-process LoRA SFT with `MiMoAudioDataCollator` on the tiny model equals one process on the same global batch:
the Transformers `Trainer` under DDP (`accelerate launch`, 2 CPU processes, gloo), FSDP2 (`fully_shard` on every
Qwen2 decoder layer: backbone, patch encoder, patch decoder; launched the same way) and gradient accumulation in one
process. The FSDP2 run's sharded checkpoint reloads into one process with the same outputs. The runs:
tests/distributed/sft_lora.py (which says why FSDP2 runs without the `Trainer` on CPU)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "distributed" / "sft_lora.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
# On a CPU-only host, `--multi_gpu` is the flag that makes `accelerate launch` start N processes with torchrun (`--cpu`
# starts one); `use_cpu=True` / `PartialState(cpu=True)` in the script then selects the gloo backend.
LAUNCH = ["--multi_gpu", "--num_processes", "2"]
ENGINES = {"ddp": [], "fsdp2": ["--engine", "fsdp2"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], output_dir: Path, *script_args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [*command, str(SCRIPT), "--output_dir", str(output_dir), *script_args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return torch.load(output_dir / "results.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 steps of AdamW (lr 1e-2) on a global batch of 4 samples: one process, DDP and FSDP2 over 2 processes."""
    root = tmp_path_factory.mktemp("distributed")
    results = {"single": _run([sys.executable], root / "single")}
    for name, engine in ENGINES.items():
        launcher = [*ACCELERATE, *LAUNCH, "--main_process_port", str(_free_port())]
        results[name] = _run(launcher, root / name, *engine)
    results["fsdp2"]["dir"] = root / "fsdp2"
    return results


def _assert_same_training(got, expected, parameter_atol=5e-5):
    # Losses (fp32, averaged over processes by the Trainer): summation order only, 1e-6 relative.
    assert len(got["losses"]) == len(expected["losses"]) == 3
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=1e-6, atol=0)
    assert got["losses"][-1] < got["losses"][0] - 0.5  # it trains
    names = sorted(expected["parameters"])
    assert len(names) > 0 and sorted(got["parameters"]) == names == sorted(got["first_gradients"])
    for name in names:
        torch.testing.assert_close(
            got["initial_parameters"][name], expected["initial_parameters"][name], rtol=0, atol=0
        )
        # First optimizer step's gradient, tensor by tensor (largest entries ~0.1): reduction order only.
        torch.testing.assert_close(got["first_gradients"][name], expected["first_gradients"][name], rtol=0, atol=1e-6)
        # Updates after 3 AdamW steps (~3e-2 each); Adam's normalisation amplifies the 1e-8 gradient differences of
        # near-zero entries, measured up to 1e-5.
        got_update = got["parameters"][name] - got["initial_parameters"][name]
        expected_update = expected["parameters"][name] - expected["initial_parameters"][name]
        torch.testing.assert_close(got_update, expected_update, rtol=0, atol=parameter_atol)
    moved = max((expected["parameters"][n] - expected["initial_parameters"][n]).abs().max() for n in names)
    assert moved > 1e-2
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=1e-4)
    for got_logits, expected_logits in zip(got["audio_logits"], expected["audio_logits"], strict=True):
        torch.testing.assert_close(got_logits, expected_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process(runs, strategy):
    """Losses of 3 steps, the LoRA gradients of step 1 and the LoRA updates after step 3 equal the single-process run
    on the same global batch (each process gets half; both halves have the same trained-token counts)."""
    assert runs[strategy]["world_size"] == 2 and runs["single"]["world_size"] == 1
    if strategy == "fsdp2":
        assert runs[strategy]["units"] == 6  # 2 backbone + 2 patch encoder + 2 patch decoder layers, plus the root
    _assert_same_training(runs[strategy], runs["single"])


def test_gradient_accumulation_equals_one_batch(runs, tmp_path):
    """Two micro-batches of 2 with gradient accumulation equal one batch of 4: the Trainer divides the model's loss by
    the accumulation steps (the model declares `accepts_loss_kwargs = False`; without it, the Trainer sums the
    micro-batch losses and, across processes, multiplies the loss by the process count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--gradient_accumulation_steps", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    _assert_same_training(torch.load(tmp_path / "results.pt"), runs["single"])


def test_fsdp2_sharded_checkpoint_reloads_into_one_process(runs, tmp_path):
    """The FSDP2 run's checkpoint (`torch.distributed.checkpoint`, one shard file per process) is converted with
    `dcp_to_torch_save` and loaded into the LoRA model in one process: every tensor is there, the LoRA weights equal
    the FSDP2 run's (gathered) exactly, and the text and audio logits equal the single-process run's trained model
    (1e-4; fp32). Saved as a PEFT adapter from there, it reloads with `PeftModel.from_pretrained` unchanged."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoTokenizer

    from transformers_mimo import MiMoAudioDataCollator

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import sft_lora
    finally:
        sys.path.remove(str(SCRIPT.parent))

    checkpoint = runs["fsdp2"]["dir"] / "checkpoint"
    assert len(list(checkpoint.glob("*.distcp"))) == 2
    dcp_to_torch_save(checkpoint, tmp_path / "full.pt")
    model = sft_lora.lora_model(sft_lora.load_model()).eval()
    model.load_state_dict(torch.load(tmp_path / "full.pt"), strict=True)
    state = sft_lora.lora_state(model)
    assert sorted(state) == sorted(runs["fsdp2"]["parameters"])
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, runs["fsdp2"]["parameters"][name], rtol=0, atol=0)

    tokenizer = AutoTokenizer.from_pretrained(sft_lora.CHECKPOINT)
    batch = MiMoAudioDataCollator(tokenizer, model.config.audio_empty_ids)(
        sft_lora.build_dataset(model.config, tokenizer, 4)[:1]
    )
    with torch.no_grad():
        outputs = model(**batch)
        with model.disable_adapter():
            untrained = model(**batch).logits
    torch.testing.assert_close(outputs.logits, runs["single"]["logits"], rtol=0, atol=1e-4)
    for got, expected in zip(outputs.audio_logits, runs["single"]["audio_logits"], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (untrained - outputs.logits).abs().max() > 1e-2  # the adapter matters

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(sft_lora.load_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, outputs.logits, rtol=0, atol=0)


def test_policy_gradient_through_compute_logprobs_under_ddp(tmp_path):
    """The backward `MiMoAudioGRPOTrainer` runs (text + audio log-probabilities, LoRA on the LLM and the patch decoder)
    gives the same LoRA gradients under DDP (2 processes, one half each; the patch decoder runs after the wrapper's
    forward, and on a dummy patch on the process without audio) as one process on the whole batch: exactly equal here,
    asserted to 1e-6."""
    script = REPO / "tests" / "distributed" / "logprobs_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    results = {}
    for name, command in (
        ("single", [sys.executable]),
        ("ddp", [*ACCELERATE, *LAUNCH, "--main_process_port", str(_free_port())]),
    ):
        (tmp_path / name).mkdir()
        done = subprocess.run(
            [*command, str(script), "--output_dir", str(tmp_path / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-5000:]
        results[name] = torch.load(tmp_path / name / "results.pt")
    single, ddp = results["single"], results["ddp"]
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    torch.testing.assert_close(ddp["losses"], single["losses"], rtol=0, atol=1e-6)
    assert sorted(ddp["gradients"]) == sorted(single["gradients"])
    for name, gradient in single["gradients"].items():
        torch.testing.assert_close(ddp["gradients"][name], gradient, rtol=0, atol=1e-6)
    decoder = [name for name, gradient in single["gradients"].items() if "patch_decoder" in name and gradient.any()]
    assert len(decoder) >= 8  # the audio codes' log-probabilities reach the patch decoder's LoRA


def test_sft_trainer_example_runs_with_two_processes(tmp_path):
    """examples/sft_trainer.py as written (the `Trainer`, LoRA, ASR + TTS pairs) with `accelerate launch` and 2 CPU
    processes: 4 steps, the loss falls at every step, the adapter is saved."""
    import re

    command = [
        *ACCELERATE,
        *LAUNCH,
        "--main_process_port",
        str(_free_port()),
        str(REPO / "examples" / "sft_trainer.py"),
        "--model",
        str(REPO / "tests/fixtures/golden/lm_a/checkpoint"),
        "--audio_tokenizer",
        str(REPO / "tests/fixtures/golden/tok_a/checkpoint"),
        "--use_cpu",
        "--output_dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    losses = [float(value) for value in re.findall(r"step \d+: loss ([\d.]+)", done.stdout)]
    assert len(losses) == 4 and all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert (tmp_path / "adapter_model.safetensors").exists()
