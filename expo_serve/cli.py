"""The `expo-serve` command line (DESIGN.md §3). Every failure is one sentence and exit code 1."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from . import __version__
from .errors import ExpoError


class _ConsoleProgress:
    """A progress bar on stderr for tensor-by-tensor work."""

    def __init__(self, label: str):
        self.label = label
        self._bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.label, unit="tensor", file=sys.stderr, dynamic_ncols=True)
        self._bar.n = done
        self._bar.set_postfix_str(name[-48:], refresh=True)
        if done >= total:
            self._bar.close()


TRUST_REMOTE_CODE_HELP = ("let a tokenizer shipped as code with the checkpoint (InternLM2's), with no tokenizer.json "
                          "beside it, run that code (default: refuse)")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _cmd_delta_build(args) -> int:
    from .delta.build import build_delta
    from .delta.sources import open_source

    manifest = build_delta(
        open_source(args.sft, trust_remote_code=args.trust_remote_code),
        open_source(args.aligned, trust_remote_code=args.trust_remote_code),
        args.out,
        encoding=args.format,
        rank=args.rank,
        group_size=args.group_size,
        bits=args.bits,
        dtype=args.dtype,
        progress=_ConsoleProgress("building delta"),
        distill=_distill_config(args),
    )
    stored = sum(t["stored_bytes"] for t in manifest["tensors"].values())
    print(f"wrote {args.out}: {len(manifest['tensors'])} tensors, {stored / 2**20:.1f} MiB ({args.format})")
    d = manifest.get("distillation")
    if d and d["loss_before"] is not None:
        print(f"distilled scales: loss {d['loss_before']:.4g} -> {d['loss_after']:.4g} (mean share of each layer's shift lost), "
              f"{d['steps']} steps a layer on {d['calibration']['tokens']} calibration tokens")
    return 0


def _distill_config(args):
    if not args.distill:
        if args.calibration is not None or args.distill_steps is not None:
            raise ExpoError("--calibration and --distill-steps only apply with --distill")
        return None
    from .delta.distill import DEFAULT_STEPS, DistillConfig

    return DistillConfig(calibration=args.calibration, steps=args.distill_steps or DEFAULT_STEPS,
                         progress=_ConsoleProgress("distilling scales"))


def _cmd_delta_inspect(args) -> int:
    from .delta.inspect import delta_report, format_report
    from .delta.store import DeltaCheckpoint

    report = delta_report(DeltaCheckpoint(args.dir))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_delta_export(args) -> int:
    from .delta.export_peft import export_peft

    result = export_peft(args.dir, args.peft)
    print(f"wrote {args.peft}: a PEFT LoRA adapter over {result['modules']} modules (rank {result['rank']}, "
          f"scale 1 = α 0; serve α with a LoRA scale of 1+α)")
    if result["left_out"]:
        print(f"warning: {len(result['left_out'])} tensors of the delta are not in the adapter:", file=sys.stderr)
        for name, why in result["left_out"].items():
            print(f"  {name}: {why}", file=sys.stderr)
    return 0


def _cmd_merge(args) -> int:
    from .delta.merge import merge
    from .delta.sources import open_source
    from .delta.store import DeltaCheckpoint

    merge(open_source(args.sft), DeltaCheckpoint(args.delta), args.alpha, args.out, dtype=args.dtype, progress=_ConsoleProgress("merging"))
    print(f"wrote {args.out}: θ_sft + (1 + {args.alpha:g})·Δ")
    return 0


def _cmd_serve(args) -> int:
    from .server.runner import serve
    from .server.settings import settings_from_args

    return serve(settings_from_args(args))


def _cmd_demo(args) -> int:
    from .demo.run import run_demo
    from .server.runner import serve_demo

    pair, delta = run_demo()
    if args.no_serve:
        return 0
    return serve_demo(pair, args.host, args.port, delta=delta, experiments=args.experiments, db=args.db,
                      admin_key=args.admin_key)


def _cmd_sweep(args) -> int:
    from .alpha_sweep import sweep

    result = sweep(args.sft, delta=args.delta, aligned=args.aligned, prompts=args.prompts, alphas=args.alphas,
                   judge=args.judge, out=args.out, n=args.n, arms=args.arms, temperature=args.temperature,
                   max_tokens=args.max_tokens, beta=args.beta, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, alpha_min=args.alpha_min,
                   alpha_max=args.alpha_max, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                   max_num_seqs=args.max_num_seqs, trust_remote_code=args.trust_remote_code)
    print(result.summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expo-serve", description="Serve ExPO models with α chosen per request.")
    parser.add_argument("--version", action="version", version=f"expo-serve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    delta = commands.add_parser("delta", help="build or inspect a delta Δ = θ_aligned − θ_sft")
    delta_commands = delta.add_subparsers(dest="delta_command", required=True, metavar="ACTION")
    build = delta_commands.add_parser("build", help="build a delta folder from an SFT/aligned pair")
    build.add_argument("--sft", required=True, help="SFT model: HF folder, .gguf file or hub id")
    build.add_argument("--aligned", required=True, help="aligned (DPO/RLHF) model: HF folder, .gguf file or hub id")
    build.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    build.add_argument("--format", default="dense", choices=["dense", "int8", "int4", "bit", "lowrank", "mixed"], help="encoding of 2-D tensors (default: dense)")
    build.add_argument("--rank", type=_positive_int, default=64, help="rank for --format lowrank (default: 64)")
    build.add_argument("--group-size", type=_positive_int, default=128, help="group size for --format int4 (default: 128)")
    build.add_argument("--bits", type=_positive_float, default=1.0,
                       help="bits per parameter of Δ for --format mixed: 8/4/2-bit bands of singular vectors (default: 1.0)")
    build.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="storage dtype of dense values and low-rank factors (default: the SFT's)")
    build.add_argument("--distill", action="store_true", help="after sign compression, fit each per-row scale of the bit tensors so "
                       "that each layer matches the aligned model's on calibration text (BitDelta's scale distillation)")
    build.add_argument("--calibration", help="calibration text for --distill: a .txt of plain text, or a .jsonl of {\"prompt\"} or "
                       "{\"messages\"} lines, chat-formatted with the aligned tokenizer (default: the demo's own texts)")
    build.add_argument("--distill-steps", type=_positive_int, help="Adam steps per layer for --distill (default: 200)")
    build.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    build.set_defaults(run=_cmd_delta_build)

    inspect = delta_commands.add_parser("inspect", help="show a delta's manifest, sizes and errors")
    inspect.add_argument("dir", help="delta folder")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=_cmd_delta_inspect)

    export = delta_commands.add_parser("export", help="write a lowrank or mixed delta in another server's format")
    export.add_argument("dir", help="delta folder")
    export.add_argument("--peft", required=True, metavar="DIR",
                        help="output folder for a PEFT LoRA adapter (scale 1+α serves ExPO approximately)")
    export.set_defaults(run=_cmd_delta_export)

    merge = commands.add_parser("merge", help="write θ_sft + (1+α)·Δ as a Hugging Face checkpoint")
    merge.add_argument("--sft", required=True, help="SFT model: HF folder, .gguf file or hub id")
    merge.add_argument("--delta", required=True, help="delta folder from `expo-serve delta build`")
    merge.add_argument("--alpha", required=True, type=_finite_float, help="extrapolation strength α (-1 gives θ_sft, 0 θ_aligned)")
    merge.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    merge.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="dtype of the written weights (default: the SFT's)")
    merge.set_defaults(run=_cmd_merge)

    from .server.settings import add_settings_arguments

    serve = commands.add_parser("serve", help="serve θ_sft + (1+α)·Δ over OpenAI's HTTP API, α chosen per request",
                                description="Options can also be set as environment variables: --max-num-seqs is "
                                            "EXPO_SERVE_MAX_NUM_SEQS (the option wins).")
    add_settings_arguments(serve)
    serve.set_defaults(run=_cmd_serve)

    demo = commands.add_parser("demo", help="prepare the embedded demo pair (cached), show it, and serve it")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve the demo on (default: 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="port to serve the demo on (default: 8000)")
    demo.add_argument("--experiments", help="YAML or JSON file of A/B experiments to run on the demo")
    demo.add_argument("--db", help="experiments database URL (default: SQLite under EXPO_HOME)")
    demo.add_argument("--admin-key", help="key for the experiment admin routes")
    demo.add_argument("--no-serve", action="store_true", help="show the answers and exit without serving")
    demo.set_defaults(run=_cmd_demo)

    sweep = commands.add_parser("sweep", help="generate every α of a grid in one batched run, judge the answers, recommend α",
                                description="Writes OUT/samples.jsonl, results.json, results.csv, report.md, sweep.png "
                                            "and experiments.yaml (α = 0 as control plus the best --arms candidates).")
    sweep_model = sweep.add_mutually_exclusive_group(required=True)
    sweep.add_argument("--sft", required=True, help="SFT model: HF folder, .gguf file or hub id")
    sweep_model.add_argument("--delta", help="delta folder from `expo-serve delta build`")
    sweep_model.add_argument("--aligned", help="aligned model (the delta is computed at load)")
    sweep.add_argument("--prompts", required=True, help="JSONL file: one {\"prompt\": ...} or {\"messages\": [...]} a line, optional \"id\"")
    sweep.add_argument("--alphas", required=True, help="α values, a list 0,0.1,0.3,1 or a range START:END:STEP such as 0:2:0.25 (end included); 0 is always added; write --alphas=-0.5,0,1 when the first is negative")
    sweep.add_argument("--judge", required=True, help="implicit | reward-model:PATH | openai:URL[#MODEL] (URL as the openai client's base_url, e.g. http://127.0.0.1:8000/v1)")
    sweep.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    sweep.add_argument("--n", type=_positive_int, default=1, help="samples per prompt and α (default: 1)")
    sweep.add_argument("--arms", type=_positive_int, default=2, help="candidates besides α = 0 in experiments.yaml (default: 2)")
    sweep.add_argument("--temperature", type=_finite_float, default=0.0, help="sampling temperature (default: 0, greedy)")
    sweep.add_argument("--max-tokens", type=_positive_int, default=256, help="most tokens per answer (default: 256)")
    sweep.add_argument("--beta", type=_finite_float, default=0.1, help="β of the implicit judge (default: 0.1)")
    sweep.add_argument("--top-p", type=_finite_float, default=1.0, help="nucleus sampling mass (default: 1)")
    sweep.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 for off (default: 0)")
    sweep.add_argument("--min-p", type=_finite_float, default=0.0, help="min-p sampling (default: 0)")
    sweep.add_argument("--repetition-penalty", type=_finite_float, default=1.0, help="(default: 1, off)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of sampling and of the bootstrap (default: 0)")
    sweep.add_argument("--alpha-min", type=_finite_float, default=-1.0, help="lowest α allowed, as for serve (default: -1)")
    sweep.add_argument("--alpha-max", type=_finite_float, default=25.0, help="highest α allowed, as for serve (default: 25)")
    sweep.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    sweep.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"], help="(default: float32)")
    sweep.add_argument("--max-model-len", type=_positive_int, help="context window (default: the model's, at most 4096)")
    sweep.add_argument("--max-num-seqs", type=_positive_int, default=64, help="sequences decoded together (default: 64)")
    sweep.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    sweep.set_defaults(run=_cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ExpoError as exc:
        print(f"expo-serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("expo-serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
