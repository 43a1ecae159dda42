"""The `opdistill` command: collect, train, demo, analyze. Every subcommand has --help."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import OpdistillError


def _collect(args: argparse.Namespace) -> int:
    from .teachers.collect import CollectOptions, collect

    opts = CollectOptions(
        prompts=args.prompts, out=args.out, teacher_model=args.teacher_model, teacher_url=args.teacher_url or "",
        api_key_env=args.api_key_env, system=args.system or "", n=args.n, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_tokens, concurrency=args.concurrency, max_attempts=args.max_attempts, retry_base_delay=args.retry_base_delay,
        timeout=args.timeout,
        batch_size=args.batch_size, precision=args.precision, seed=args.seed, progress=not args.no_progress,
    )
    summary = collect(opts)
    for line in summary.lines():
        print(line)
    if summary.interrupted:
        print("interrupted: every response received so far is stored; rerun the same command to resume", file=sys.stderr)
        return 130
    if summary.failed:
        print(f"{summary.failed} request(s) failed after their retries (see {args.out}.failures.jsonl); rerun to retry them", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import config_help, load_config

    if args.help_config:
        print(config_help(args.method or "seqkd"))
        return 0
    config_path = None
    overrides = list(args.overrides)
    if args.config and "=" in args.config:
        overrides.insert(0, args.config)
    else:
        config_path = args.config
    config = load_config(config_path, overrides, method=args.method)
    from .methods import train

    summary = train(config)
    print(f"student: {summary.get('student')}")
    if summary.get("initial_eval") or summary.get("final_eval"):
        print(f"held-out: before {summary.get('initial_eval')} after {summary.get('final_eval')}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    run_demo(DemoOptions(**{name: getattr(args, name) for name in DemoOptions.__dataclass_fields__ if hasattr(args, name)}))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from .analysis.updates import AnalysisOptions, analyze_checkpoints, compare_runs, threshold_key, write_outputs

    if args.threads:
        torch.set_num_threads(args.threads)
    options = AnalysisOptions(
        eta=args.eta, abs_threshold=args.abs_threshold, changed=args.changed, exact_svd_max_dim=args.exact_svd_max_dim,
        svd_rank=args.svd_rank, mask_alpha=args.mask_alpha, principal_rank_frac=args.principal_rank_frac,
        spectral=not args.no_spectra, device=args.device, seed=args.seed, progress=not args.no_progress,
    )
    analysis = analyze_checkpoints(args.base, args.tuned, options, save_mask=args.save_mask)
    if args.compare:
        analysis.summary["compare"] = compare_runs(args.base, args.compare[0], args.compare[1], options)
    paths = write_outputs(analysis, args.out)
    g = analysis.summary["global"]
    abs_key = f"sparsity_abs_{threshold_key(args.abs_threshold)}"
    print(f"{g['tensors_analysed']} tensors, {g['numel']:,} coordinates in {analysis.summary['seconds']:.0f} s")
    print(f"relative update {g['relative_update']:.4g}; sparsity bf16-aware {g['sparsity_bf16']:.4f}, |delta| < {args.abs_threshold:g} {g[abs_key]:.4f}")
    if g.get("principal_enrichment") is not None:
        print(f"enrichment of changed coordinates: principal mask {g['principal_enrichment']:.3f}, low-magnitude mask {g['lowmag_enrichment']:.3f}")
    if analysis.summary.get("skipped"):
        print(f"skipped (not in both or not float): {', '.join(analysis.summary['skipped'])}")
    if args.save_mask:
        print(f"changed mask ({args.changed}, density {g['changed_density']:.4f}): {args.save_mask}")
    if args.compare:
        c = analysis.summary["compare"]
        print(f"compare: Jaccard {c['jaccard']} vs random baseline {c['random_baseline']}")
    print(f"summary: {paths['summary']}")
    print(f"report: {paths['report']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opdistill", description="On-policy distillation of large language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("collect", help="collect teacher responses (API or local model) into a resumable JSONL store",
                       description="Collect teacher responses. Reruns resume: stored responses are never requested again.")
    c.add_argument("--prompts", required=True, help="prompt file (JSONL/Parquet/datasets dir) or builtin:train / builtin:heldout; path[a:b] selects rows")
    c.add_argument("--out", required=True, help="output JSONL store (created or resumed)")
    c.add_argument("--teacher-model", required=True, help="model name at the endpoint, or a local/built-in model when --teacher-url is absent")
    c.add_argument("--teacher-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    c.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (default OPENAI_API_KEY); the key is never written anywhere")
    c.add_argument("--system", help="privileged system prompt that only the teacher sees")
    c.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    c.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8; 0 = greedy)")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    c.add_argument("--max-tokens", type=int, default=256, help="max new tokens per response (default 256)")
    c.add_argument("--concurrency", type=int, default=8, help="API requests in flight (default 8)")
    c.add_argument("--max-attempts", type=int, default=6, help="retry budget per request, first try included (default 6)")
    c.add_argument("--retry-base-delay", type=float, default=0.5, help="first back-off in seconds, doubled per retry, capped at 30 (default 0.5); a server's Retry-After wins")
    c.add_argument("--timeout", type=float, default=120.0, help="seconds per API attempt (default 120)")
    c.add_argument("--batch-size", type=int, default=16, help="local teacher generation batch (default 16)")
    c.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="local teacher precision (default auto: bf16 where it is fast)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c.set_defaults(func=_collect)

    t = sub.add_parser("train", help="train a student (method: seqkd) from a YAML config and key=value overrides",
                       description="Train a student. Example: opdistill train examples/seqkd_selfinstruct.yaml max_steps=20")
    t.add_argument("config", nargs="?", help="YAML config file (optional)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-5 batch_size=16")
    t.add_argument("--method", choices=["seqkd", "gad", "opd"], help="method (overrides the config's `method`)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    t.set_defaults(func=_train)

    from .demo import DemoOptions

    defaults = DemoOptions(out="runs/demo")
    d = sub.add_parser("demo", help="the built-in end-to-end job: French context distillation of SmolLM2-135M with GAD",
                       description="Collect from a French-prompted teacher, train the bare student (GAD: SeqKD warm-up, then "
                                   "adversarial steps; or SeqKD alone), evaluate every model on held-out prompts, write report.html. "
                                   "Docs: docs/demo.md.")
    d.add_argument("--out", default=defaults.out, help=f"run directory (default {defaults.out})")
    d.add_argument("--method", choices=["gad", "seqkd", "opd"], default=defaults.method, help=f"training method (default {defaults.method})")
    d.add_argument("--system", default=defaults.system, help=f"the teacher's privileged system prompt (default {defaults.system!r})")
    numbers = [("train_prompts", int, "built-in train prompts to collect"), ("heldout_prompts", int, "built-in held-out prompts to evaluate"),
               ("max_new_tokens", int, "response length for collection, training and evaluation"),
               ("batch_size", int, "prompts per training step"), ("lr", float, "student learning rate"),
               ("warmup_steps", int, "GAD warm-up steps (SeqKD + discriminator)"), ("d_only_steps", int, "warm-up steps where only the discriminator trains"),
               ("gad_steps", int, "GAD adversarial steps"), ("n_samples", int, "GAD student samples per prompt"),
               ("d_lr", float, "GAD discriminator learning rate"), ("discriminator_layers", int, "GAD discriminator depth (0: the whole student)"),
               ("seqkd_steps", int, "steps of --method seqkd"), ("opd_steps", int, "steps of --method opd"),
               ("opd_batch_size", int, "prompts per step of --method opd"), ("opd_lr", float, "learning rate of --method opd"),
               ("divergence", str, "token-level objective of --method opd"),
               ("beta", float, "--method opd: jsd's mixture weight or Veto's β (-1: the divergence's default)"),
               ("horizon_tokens", int, "--method opd: truncated rollouts of this many tokens (0: full)"), ("seed", int, "random seed")]
    for name, kind, text in numbers:
        d.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=getattr(defaults, name), help=f"{text} (default {getattr(defaults, name)})")
    d.set_defaults(func=_demo)

    from .analysis.options import AnalysisOptions

    o = AnalysisOptions()
    a = sub.add_parser("analyze", help="what fine-tuning did to the weights: sparsity, rank, principal alignment (summary.json, report.html)",
                       description="Compare two checkpoints of the same architecture tensor by tensor (streamed; see docs/analysis.md). "
                                   "Example: opdistill analyze smollm2-135m-instruct runs/demo/student --out runs/demo/analysis")
    a.add_argument("base", metavar="BASE", help="the checkpoint training started from: directory, .safetensors file, built-in name or cached hub id")
    a.add_argument("tuned", metavar="TUNED", help="the trained checkpoint (same architecture)")
    a.add_argument("--out", required=True, help="output directory: summary.json, report.html, spectra.safetensors")
    a.add_argument("--save-mask", metavar="MASK", help="write the changed-mask (bool safetensors) for train_mask: MASK")
    a.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="Jaccard of the changed masks of two runs from BASE (checkpoints or saved masks) vs the random baseline pq/(p+q-pq)")
    a.add_argument("--changed", choices=["bf16", "abs"], default=o.changed, help=f"definition behind the changed mask, overlaps and --compare (default {o.changed})")
    a.add_argument("--eta", type=float, default=o.eta, help=f"bf16-aware tolerance: unchanged iff |dw| <= eta*max(|w|,|w'|) (default {o.eta:g})")
    a.add_argument("--abs-threshold", type=float, default=o.abs_threshold, help=f"absolute definition: unchanged iff |dw| < this (default {o.abs_threshold:g})")
    a.add_argument("--exact-svd-max-dim", type=int, default=o.exact_svd_max_dim,
                   help=f"exact spectra when min(m, n) <= this, else randomised top --svd-rank (default {o.exact_svd_max_dim})")
    a.add_argument("--svd-rank", type=int, default=o.svd_rank, help=f"singular values computed on the randomised path (default {o.svd_rank})")
    a.add_argument("--mask-alpha", type=float, default=o.mask_alpha, help=f"density of the principal and low-magnitude masks (default {o.mask_alpha:g})")
    a.add_argument("--principal-rank-frac", type=float, default=o.principal_rank_frac,
                   help=f"rank k = this * min(m, n) of the principal mask's reconstruction (default {o.principal_rank_frac:g})")
    a.add_argument("--no-spectra", action="store_true", help="skip spectra and principal alignment (the slow part); sparsity and masks stay")
    a.add_argument("--device", default=o.device, help="auto (cuda when available), cpu or cuda[:N] (default auto)")
    a.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice; 1 is faster on a machine busy with other jobs)")
    a.add_argument("--seed", type=int, default=o.seed, help="seed of the randomised SVD")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except OpdistillError as err:
        print(f"opdistill {args.command}: error: {err.message}", file=sys.stderr)
        if err.fix:
            print(f"  fix: {err.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"opdistill {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
