"""``bench.long_sequence`` in its CPU mode: the exact-slice check it runs on the GPU at 540k
and 128k tokens, here on a small shape under the interpreter."""
import pytest
import torch

from bench import common, long_sequence

# The CPU mode runs the kernels under the interpreter, which conftest switches off on CUDA.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the GPU runs bench.long_sequence itself")


def test_cpu_check_passes_and_records_a_row(tmp_path):
    assert long_sequence.main(["--cpu", "--results-dir", str(tmp_path)]) == 0
    (row,) = common.read_rows(tmp_path / "long_sequence.csv")
    assert row["error"] == ""
    assert row["kernel"] == "sf_attn_long" and row["device"] == "cpu"
    assert "dk" in row["note"] and row["git_sha"]


def test_local_reference_sees_a_wrong_kernel(monkeypatch, tmp_path):
    # The check must be able to fail: scale the kernel's output and it has to report a mismatch.
    real = long_sequence.sf_attention
    monkeypatch.setattr(long_sequence, "sf_attention", lambda *a, **k: 1.05 * real(*a, **k))
    assert long_sequence.main(["--cpu", "--results-dir", str(tmp_path)]) == 1
