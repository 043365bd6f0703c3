"""The compression quality report measures what it says: KL shares of the alignment shift."""
import pytest
import torch
from factories import CORPUS

from expo_serve.delta.build import build_delta
from expo_serve.delta.quality import _mean_kl, quality_report
from expo_serve.delta.sources import open_source
from expo_serve.delta.store import DeltaCheckpoint


def test_mean_kl_matches_torch():
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(7, 11), -1)
    q = torch.log_softmax(torch.randn(7, 11), -1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
    assert _mean_kl(p, q) == pytest.approx(float(expected), rel=1e-5)
    assert _mean_kl(p, p) == 0.0


def test_quality_orders_encodings_by_fidelity(pairs, tmp_path):
    sft_dir, aligned_dir = pairs("llama")
    sft, aligned = open_source(sft_dir), open_source(aligned_dir)
    build_delta(sft, aligned, tmp_path / "exact", dtype="float32")
    compact = {}
    for encoding in ("dense", "int8", "bit"):
        build_delta(sft, aligned, tmp_path / encoding, encoding=encoding, dtype="float32")
        compact[encoding] = DeltaCheckpoint(tmp_path / encoding)
    rows = quality_report(sft, sft_dir, DeltaCheckpoint(tmp_path / "exact"), compact, CORPUS, alphas=(0.0, 1.0))
    lost = {(r.encoding, r.alpha): r.shift_lost for r in rows}
    assert len(rows) == 6 and all(r.kl_sft > 0 for r in rows)
    for alpha in (0.0, 1.0):
        assert lost[("dense", alpha)] < 1e-9
        assert 0 < lost[("int8", alpha)] < lost[("bit", alpha)] < 2
