"""benchmarks/gpu_check.py cannot rot: its CPU smoke mode runs the GPU check's code paths (every strategy
under TorchTrainer, the tokens/s and MFU arithmetic, the checkpoint + resume comparison, the table)."""

from __future__ import annotations

import pytest
import transformers

_verbosity = transformers.logging.get_verbosity()
from benchmarks import gpu_check  # noqa: E402

# benchmarks/common.py quiets transformers' logging for its tables: the rest of the suite must not inherit that
transformers.logging.set_verbosity(_verbosity)


def test_known_peaks_pick_the_specific_name_first():
    assert gpu_check.known_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.known_peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_check.known_peak_tflops("Some Future GPU") is None  # measured instead


def test_flops_per_step_gpt2_small():
    plan = gpu_check.Plan(smoke=False, workers=1, use_gpu=True, precisions=("bf16",), resume_precision="bf16")
    # GPT-2 small: ~124M parameters, ~85M in the blocks + 38.6M in the tied head; 6*N*T + attention
    n = 12 * 12 * 768 ** 2 + 50257 * 768
    assert gpu_check.flops_per_step(plan) == pytest.approx((6 * n + 12 * 12 * 1024 * 768) * 8 * 1024)


@pytest.mark.ray
def test_gpu_check_smoke(ray_cluster, capsys):
    rc = gpu_check.main(["--smoke"])
    out = capsys.readouterr().out
    table = out[out.index("strategy prec"):]
    print(table)
    rows = {line.split()[0]: line for line in table.splitlines()[2:] if line.strip()}
    assert set(rows) == {"ddp", "fsdp", "zero3"}, table
    for name, line in rows.items():
        assert line.rstrip().endswith("ok"), line
        assert " gloo " in line and " bf16 " in line, line
    assert "bit-equal" in rows["fsdp"], rows["fsdp"]  # the resumed run's final weights equal the uninterrupted run's
    assert rc == 0
