"""The compression quality report measures what it says: KL shares of the alignment shift."""
import pytest
import torch
from factories import CORPUS

from expo_serve.delta.build import build_delta
from expo_serve.delta.quality import ALPHAS, _mean_kl, format_quality_table, quality_report
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
    rows = quality_report(sft, sft_dir, DeltaCheckpoint(tmp_path / "exact"), compact, CORPUS)
    assert ALPHAS == (0.0, 0.3, 1.0, 2.5)
    lost = {(r.encoding, r.alpha): r.shift_lost for r in rows}
    assert len(rows) == 12 and all(r.kl_sft > 0 for r in rows)
    for alpha in ALPHAS:
        assert lost[("dense", alpha)] < 1e-9
        assert 0 < lost[("int8", alpha)] < lost[("bit", alpha)] < 2
    kl = {(r.encoding, r.alpha): r.kl_compact for r in rows}
    assert kl[("bit", 2.5)] > kl[("bit", 0.0)]  # the further out, the more the encoding's error is amplified

    table = format_quality_table(rows).splitlines()
    assert table[0] == "| encoding | " + " | ".join(f"α = {a:g}: lost | α = {a:g}: KL" for a in ALPHAS) + " |"
    bit_row = next(line for line in table if line.startswith("| bit |")).strip("| ").split(" | ")
    assert len(bit_row) == 1 + 2 * len(ALPHAS)
    assert float(bit_row[-2]) == pytest.approx(lost[("bit", 2.5)], rel=1e-2)
    assert float(bit_row[-1]) == pytest.approx(kl[("bit", 2.5)], rel=1e-2)
    assert table[-1].startswith("KL(exact‖θ_sft), the whole shift: α = 0: ")
