"""The ``megamoe`` command line.

Subcommands available in this build:

* ``megamoe train --config F [--set section.key=value ...] [--nproc N] [--summary-json PATH]``
* ``megamoe data prepare --input PATHS --output DIR [--tokenizer byte|bpe] ...``
* ``megamoe config show --config F [--set ...]`` prints the validated, resolved config.
* ``megamoe plan --config F --gpus N [--gpu H800] [--global-batch B] [--json] [--search]``
* ``megamoe report RUN_DIR|SUMMARY_JSON|--job ID [--server HOST:PORT] [--output DIR]``
* ``megamoe checkpoint list DIR [--json]`` / ``megamoe checkpoint verify PATH``
* ``megamoe serve [--host H] [--port P] [--etcd URL] [--state-dir D] [--token-file F] ...``
* ``megamoe job submit|get|list|cancel|watch|logs --server HOST:PORT ...``

Errors a user can cause (bad config, missing data, bad flags) print one line
``megamoe: error: ...`` and exit with status 2; no traceback. torch-heavy
modules are imported inside the subcommands, so ``megamoe --help`` and config
validation stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trainer import __version__
from trainer.errors import MegamoeError
from trainer.quickexit import freeze_at_exit

EXIT_USAGE = 2


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable (e.g. --set train.steps=50)",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer import config

    cfg = config.load(args.config, args.overrides)
    if args.nproc < 1:
        raise MegamoeError(f"--nproc = {args.nproc} must be >= 1")
    from trainer.launch import under_torchrun

    if under_torchrun():
        if args.nproc != 1:
            raise MegamoeError("--nproc is for local runs; under torchrun the world is torchrun's")
        from trainer.launch import run_rank

        run_rank(cfg, args.summary_json, args.resume, args.resume_from, args.skip_checkpoint)
        return 0
    resume_from = None
    if args.resume or args.resume_from:
        from trainer.checkpoint.manager import resolve

        warn = lambda m: print(m, flush=True)  # noqa: E731
        found = resolve(cfg, args.resume, args.resume_from, warn, args.skip_checkpoint)
        resume_from = str(found) if found else None
    if args.nproc == 1:
        from trainer.train import train

        train(cfg, summary_path=args.summary_json, resume_from=resume_from)
    else:
        from trainer.launch import launch

        launch(cfg, args.nproc, args.summary_json, resume_from)
    return 0


def _layout_text(layout: dict) -> str:
    if not layout:
        return "?"
    ranks = layout.get("world", 1)
    return (
        f"n={layout.get('n')} dp={layout.get('dp')} pp={layout.get('pp')} "
        f"{layout.get('attention')}/{layout.get('ffn_resolved')}, "
        f"{ranks} rank{'s' if ranks != 1 else ''}"
    )


def _cmd_checkpoint_list(args: argparse.Namespace) -> int:
    import json

    from trainer.checkpoint import store

    rows = [store.describe(e) for e in store.committed(args.dir)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no committed checkpoints in {args.dir}")
        return 0
    print(f"{'step':>8}  {'MB':>8}  {'age':>8}  {'layout':<36}  path")
    for r in rows:
        age = "?" if r["age_s"] is None else f"{r['age_s'] / 60:.0f} min"
        mb = f"{r['bytes'] / 1e6:.2f}"
        print(f"{r['step']:>8}  {mb:>8}  {age:>8}  {_layout_text(r['layout']):<36}  {r['path']}")
    return 0


def _cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    from trainer.checkpoint import store

    manifest = store.read_manifest(args.path)
    problem = store.verify(args.path, manifest)
    if problem:
        print(f"checkpoint {args.path}: BAD: {problem}", file=sys.stderr)
        return 1
    files = manifest.get("files", {})
    print(
        f"checkpoint {args.path}: OK: step {manifest.get('step')}, {len(files)} files, "
        f"{manifest.get('bytes', 0) / 1e6:.2f} MB, every sha256 matches"
    )
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    import json

    from trainer import config

    cfg = config.load(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=1))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from trainer.plan.command import run_plan

    return run_plan(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.observe.report import find_summary, load_summary, write_report

    source = args.source
    if args.job:
        from service import jobcli

        _, pb, _ = jobcli._api()
        stub, metadata = jobcli._stub(args)
        try:
            job = jobcli._call(stub.GetJob, pb.GetJobRequest(job_id=args.job), metadata)
        except jobcli.ApiError as exc:
            raise MegamoeError(f"job {args.job} on {args.server}: {exc}") from None
        source = job.status.summary_path
        if not source:
            state = pb.JobState.Name(job.status.state)
            raise MegamoeError(f"job {args.job} has no run summary yet (it is {state})")
    path = find_summary(source).resolve()
    out = Path(args.output) if args.output else path.parent / "report"
    index = write_report(load_summary(path), out, source=path)
    print(f"report: {index}")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from trainer.data import prepare_corpus
    from trainer.data.demo import stdlib_sources

    inputs = list(args.input)
    include = args.include
    if args.stdlib:
        inputs += [str(p) for p in stdlib_sources()]
        include = include or "*.py"
    if not inputs:
        raise MegamoeError("data prepare: give --input PATHS and/or --stdlib")
    manifest = prepare_corpus(
        inputs,
        args.output,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        include=include or "*",
        max_bytes=args.max_bytes,
        progress=not args.quiet,
    )
    print(
        f"prepared {args.output}: {manifest['num_tokens']:,} tokens from "
        f"{manifest['num_documents']:,} documents ({manifest['tokenizer']}, "
        f"vocab {manifest['vocab_size']})"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.serve import load_options, serve

    flags = {
        "host": args.host,
        "port": args.port,
        "etcd": args.etcd,
        "state_dir": args.state_dir,
        "token_file": args.token_file,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "prefix": args.prefix,
        "executor": args.executor,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "namespace": args.namespace,
    }
    return serve(load_options(args.config, flags))


def _add_serve(sub) -> None:
    # Defaults live in service.serve.ServeOptions: a flag left out (None) does not hide the
    # value of --config.
    serve = sub.add_parser("serve", help="run the control plane (gRPC job API)")
    serve.add_argument(
        "--config",
        help="JSON file of these options (camelCase keys: host, port, etcd, stateDir, "
        "tokenFile, tlsCert, tlsKey, prefix, executor, metricsPort, metricsHost, kubernetes; "
        "see docs/SERVICE.md); flags win",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="0 = a free port (default 50051)")
    serve.add_argument("--etcd", help="HOST:PORT of etcd (default: start a private one)")
    serve.add_argument("--state-dir", help="logs, jobs, embedded etcd (default runs/service)")
    serve.add_argument("--token-file", help="require this bearer token on JobService calls")
    serve.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    serve.add_argument("--tls-key", help="... and this private key (PEM)")
    serve.add_argument("--prefix", help="etcd key prefix (default /megamoe)")
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics and the /healthz, /readyz probes (default 0 = off)",
    )
    serve.add_argument("--metrics-host", help="address of the metrics port (default 127.0.0.1)")
    serve.add_argument(
        "--executor",
        choices=["local", "kubernetes", "none"],
        help="where job nodes run: local torchrun agents (the default), kubernetes pods, or "
        "none (API only: another control plane on the same etcd runs the jobs)",
    )
    serve.add_argument(
        "--namespace",
        help="kubernetes: the namespace of the job pods (default: the control plane's own)",
    )
    serve.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megamoe", description="Train mixture-of-experts language models (MegaScale-MoE)."
    )
    parser.add_argument("--version", action="version", version=f"megamoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model locally")
    _add_config_args(train)
    train.add_argument("--nproc", type=int, default=1, help="local ranks (default 1)")
    train.add_argument("--summary-json", metavar="PATH", help="write the run summary here")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="start from the newest committed checkpoint in checkpoint.dir (none: fresh)",
    )
    resume.add_argument("--resume-from", metavar="PATH", help="start from this checkpoint")
    train.add_argument(
        "--skip-checkpoint",
        action="append",
        default=[],
        metavar="PATH@CREATED",
        help="with --resume, pass over this commit (the control plane names one a restore "
        "failed from)",
    )
    train.set_defaults(func=_cmd_train)

    ckpt = sub.add_parser("checkpoint", help="inspect checkpoints").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    listing = ckpt.add_parser("list", help="committed checkpoints in a directory, newest first")
    listing.add_argument("dir", metavar="DIR", help="a checkpoint.dir")
    listing.add_argument("--json", action="store_true", help="a JSON list of objects")
    listing.set_defaults(func=_cmd_checkpoint_list)
    check = ckpt.add_parser("verify", help="re-read one checkpoint and check every checksum")
    check.add_argument("path", metavar="PATH", help="a step-NNNNNNNN directory")
    check.set_defaults(func=_cmd_checkpoint_verify)

    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    show = cfg.add_parser("show", help="print the validated config with overrides applied")
    _add_config_args(show)
    show.set_defaults(func=_cmd_config_show)

    plan = sub.add_parser("plan", help="predict iteration time, MFU and memory on a cluster")
    _add_config_args(plan)
    plan.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    plan.add_argument("--gpu", default="H800", help="H800, H100, H200, A100, H20, B200 or cpu")
    plan.add_argument("--global-batch", type=int, help="sequences per step (train.global_batch)")
    plan.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    plan.add_argument("--search", action="store_true", help="rank the layouts that fit")
    plan.set_defaults(func=_cmd_plan)

    report = sub.add_parser("report", help="plot a run summary: PNGs and one index.html")
    which = report.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "source", nargs="?", metavar="RUN_DIR|SUMMARY_JSON", help="a summary or its directory"
    )
    which.add_argument("--job", metavar="ID", help="the summary of this control-plane job")
    report.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT, with --job")
    report.add_argument("--token-file", help="bearer token, with --job (when the server wants one)")
    report.add_argument("--ca-cert", help="CA certificate, with --job on a server with TLS")
    report.add_argument("--output", metavar="DIR", help="default: <summary's directory>/report")
    report.set_defaults(func=_cmd_report)

    _add_serve(sub)
    from service import jobcli

    jobcli.add_parser(sub)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    prep = data.add_parser("prepare", help="tokenize text files into a token directory")
    prep.add_argument("--input", nargs="+", default=[], metavar="PATH", help="files or dirs")
    prep.add_argument(
        "--stdlib", action="store_true", help="add this Python's standard-library sources"
    )
    prep.add_argument("--output", required=True, metavar="DIR")
    prep.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    prep.add_argument("--include", default=None, help="file-name glob (default '*')")
    prep.add_argument("--max-bytes", type=int, default=None, help="stop after this many bytes")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=_cmd_data_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MegamoeError as exc:
        print(f"megamoe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("megamoe: interrupted", file=sys.stderr)
        return 130
    finally:
        freeze_at_exit()  # registered last, so it runs first at exit


if __name__ == "__main__":
    sys.exit(main())
