"""`expo-serve delta inspect`: what a delta folder holds, how big it is, how much it lost."""
from __future__ import annotations

import math
from collections import Counter

from .store import DeltaCheckpoint

_BF16_BYTES = 2


def delta_report(delta: DeltaCheckpoint) -> dict:
    """Sizes, the compression ratio against a dense bf16 Δ, and per-tensor relative errors."""
    tensors = delta.manifest["tensors"]
    stored = sum(t["stored_bytes"] for t in tensors.values())
    dense_bf16 = sum(math.prod(t["shape"]) * _BF16_BYTES for t in tensors.values())
    # The overall error weights each tensor by its share of ‖Δ‖²: ‖ΔΔ‖ / ‖Δ‖ over the whole model.
    total_sq = sum(t["delta_norm"] ** 2 for t in tensors.values())
    error_sq = sum((t["rel_error"] * t["delta_norm"]) ** 2 for t in tensors.values())
    m = delta.manifest
    return {
        "folder": str(delta.folder),
        "architecture": m["architecture"],
        "sft": m["sft"],
        "aligned": m["aligned"],
        "encoding": m["encoding"],
        "dtype": m.get("dtype"),
        "group_size": m.get("group_size"),
        "rank": m.get("rank"),
        "bits": m.get("bits"),
        "tensors": len(tensors),
        "encodings": dict(Counter(t["encoding"] for t in tensors.values())),
        "stored_bytes": stored,
        "dense_bf16_bytes": dense_bf16,
        "compression_ratio": dense_bf16 / stored if stored else math.inf,
        "overall_rel_error": math.sqrt(error_sq / total_sq) if total_sq else 0.0,
        "distillation": m.get("distillation"),
        "per_tensor": [
            {"name": name, "encoding": t["encoding"], "shape": t["shape"], "stored_bytes": t["stored_bytes"], "rel_error": t["rel_error"]}
            for name, t in tensors.items()
        ],
    }


def format_report(report: dict) -> str:
    lines = [
        f"delta       {report['folder']}",
        f"model       {report['architecture']}",
        f"sft         {report['sft']['source']}  (fingerprint {report['sft']['fingerprint'][:16]})",
        f"aligned     {report['aligned']['source']}",
        f"encoding    {report['encoding']}" + (f", group {report['group_size']}" if report["group_size"] else "")
        + (f", rank {report['rank']}" if report["rank"] else "")
        + (f", {report['bits']:g} bits a parameter" if report.get("bits") else "") + (f", {report['dtype']}" if report["dtype"] else ""),
        f"tensors     {report['tensors']}  ({', '.join(f'{n} {e}' for e, n in sorted(report['encodings'].items()))})",
        f"size        {_human(report['stored_bytes'])} stored vs {_human(report['dense_bf16_bytes'])} as dense bf16"
        f"  (compression {report['compression_ratio']:.2f}x)",
        f"error       {report['overall_rel_error']:.4g}  (‖Δ − decoded‖ / ‖Δ‖ over all tensors)",
        *_distillation_lines(report.get("distillation")),
        "",
        f"{'tensor':<56} {'encoding':<8} {'shape':<16} {'bytes':>10} {'rel error':>10}",
    ]
    for t in report["per_tensor"]:
        shape = "x".join(str(s) for s in t["shape"])
        lines.append(f"{t['name']:<56} {t['encoding']:<8} {shape:<16} {_human(t['stored_bytes']):>10} {t['rel_error']:>10.4g}")
    return "\n".join(lines)


def _distillation_lines(d: dict | None) -> list[str]:
    """The recipe and the losses of `delta build --distill`, when the delta was distilled."""
    if not d:
        return []
    cal = d["calibration"]
    lines = [
        f"distilled   {d['optimizer']}, {d['steps']} steps a layer, lr {d['lr']:g}, {d['batch_sequences']} sequences a step, "
        f"{d['parametrization']}",
        f"            calibration: {cal['source']} ({cal['sequences']} sequences, {cal['tokens']} tokens, at most {cal['max_length']} each)",
        f"            objective: {d['objective']}",
    ]
    if d.get("loss_before") is not None:
        lines.append(f"            loss {d['loss_before']:.4g} before, {d['loss_after']:.4g} after (mean over {len(d['stages'])} stages)"
                     f"; {d['seconds']:.1f} s on {d['device']}")
        for stage in d["stages"]:
            lines.append(f"              {stage['stage']:<24} {stage['loss_before']:.4g} -> {stage['loss_after']:.4g}"
                         + ("" if stage["kept"] else "  (fit not kept)"))
    return lines


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
