"""The `olivepress` command: run the flow, validate a data file, chat with an exported model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from olivepress.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olivepress",
        description="Hugging Face causal LM + JSONL of prompt/response pairs → 4-bit ONNX Runtime GenAI model "
        "with a switchable LoRA adapter, as one Prefect flow run.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="validate, quantize (AWQ), fine-tune (LoRA), export to ONNX, evaluate the gate, register"
    )
    run.add_argument("--config", type=Path, help="YAML run config; flags below override it")
    run.add_argument("--model", type=Path, help="Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    run.add_argument(
        "--data", help="JSONL of {prompt, response}: a path or s3:// URI (default: the shipped sample)"
    )
    run.add_argument("--device", choices=["cpu", "gpu"], help="where to train and which ONNX target to build")
    run.add_argument("--max-steps", type=int, help="LoRA training steps")
    run.add_argument("--calibration-samples", type=int, help="examples AWQ calibrates on")
    run.add_argument("--output", type=Path, help="folder that receives the run folder (default: ./runs)")
    run.add_argument("--registry", type=Path, help="local registry folder (default: ./registry)")

    validate = commands.add_parser("validate", help="check a JSONL file; exit 1 with one line per bad line")
    validate.add_argument("file", type=Path)
    validate.add_argument("--min-chars", type=int, default=1)
    validate.add_argument("--max-chars", type=int, default=4000)

    chat = commands.add_parser("chat", help="generate from an exported model, streaming, with tokens/s")
    chat.add_argument("model_dir", type=Path, help="the run's onnx folder")
    switch = chat.add_mutually_exclusive_group()
    switch.add_argument("--adapter", type=Path, help="a .onnx_adapter file (default: the one in MODEL_DIR)")
    switch.add_argument("--no-adapter", action="store_true", help="run the quantized base without LoRA")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("prompt")

    deploy = commands.add_parser(
        "deploy",
        help="create a work pool and deployment on the Prefect API (targets: process, docker-gpu, kubernetes-gpu)",
        add_help=False,
    )
    deploy.add_argument("arguments", nargs=argparse.REMAINDER, help="see: olivepress deploy --help")

    models = commands.add_parser("models", help="list registered models and versions with their key metrics")
    models.add_argument("--config", type=Path, help="YAML run config whose registry section to read")
    models.add_argument("--registry", type=Path, help="local registry folder (default: ./registry)")
    models.add_argument("--name", help="only this model name")
    return parser


def command_run(args: argparse.Namespace) -> int:
    from olivepress.config import load_config

    config = load_config(
        args.config,
        {
            "model": args.model,
            "data": args.data,
            "device": args.device,
            "output": args.output,
            "finetune.max_steps": args.max_steps,
            "quantize.calibration_samples": args.calibration_samples,
            "registry.path": args.registry,
        },
    )
    from olivepress.flows.pipeline import new_run_dir, olivepress_flow

    run_dir = new_run_dir(config)
    print(f"olivepress: run folder {run_dir}", flush=True)
    result = olivepress_flow(config, run_dir)
    print(f"\nONNX Runtime GenAI model: {result['onnx']}")
    print(f"Report: {result['report']}")
    registration = result["registration"]
    print(f"Registered: {registration['name']} version {registration['version']} ({registration['uri']})")
    print(f'Try it: olivepress chat {result["onnx"]} "What should I pack for a week in Lisbon?"')
    return 0


def command_validate(args: argparse.Namespace) -> int:
    from olivepress.tasks.validate import validate_jsonl

    report = validate_jsonl(args.file, min_chars=args.min_chars, max_chars=args.max_chars)
    for issue in report.warnings:
        print(f"warning: line {issue.line}: {issue.reason}", file=sys.stderr)
    if not report.ok:
        print(report.to_text(), file=sys.stderr)
        return 1
    print(f"{args.file}: {report.n_records} valid records")
    return 0


def command_chat(args: argparse.Namespace) -> int:
    from olivepress.chat import chat

    adapter = None if args.no_adapter else (args.adapter or "auto")
    chat(args.model_dir, args.prompt, adapter=adapter, max_new_tokens=args.max_new_tokens)
    return 0


def command_models(args: argparse.Namespace) -> int:
    from olivepress.config import load_config

    config = load_config(args.config, {"registry.path": args.registry})
    if config.registry.backend == "azureml":
        from olivepress.azure_registry import list_azureml

        rows = list_azureml(config.registry.azureml)
        if args.name:
            rows = [row for row in rows if row["name"] == args.name]
    else:
        from olivepress.registry import LocalRegistry

        rows = [entry_row(entry) for entry in LocalRegistry(config.registry.path).entries(args.name)]
    if not rows:
        print(
            f"no registered models in {config.registry.path if config.registry.backend == 'local' else 'Azure ML'}"
        )
        return 0
    print(format_rows(rows))
    return 0


def entry_row(entry) -> dict[str, str]:
    """A local entry as a listing row: the fine-tuned variant's metrics against the base's."""
    metrics = {row["variant"]: row for row in entry.lineage.get("metrics", [])}
    tuned, base = metrics.get("fine-tuned", {}), metrics.get("base", {})
    return {
        "name": entry.name,
        "version": entry.version,
        "registered": entry.lineage.get("registered_at", "-"),
        "perplexity": f"{tuned.get('perplexity', '-')} (base {base.get('perplexity', '-')})",
        "tok/s": f"{tuned.get('decode_tok_s', '-')} (base {base.get('decode_tok_s', '-')})",
        "MB": f"{tuned.get('size_mb', '-')} (base {base.get('size_mb', '-')})",
        "data": entry.lineage.get("data", {}).get("sha256", "-")[:12],
        "path": str(entry.path),
    }


def format_rows(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    table = [header, *[[str(row.get(key, "-")) for key in header] for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table
    )


def command_deploy(args: argparse.Namespace) -> int:
    from olivepress.deployments.deploy import main as deploy_main

    return deploy_main(args.arguments)


COMMANDS = {
    "run": command_run,
    "validate": command_validate,
    "chat": command_chat,
    "models": command_models,
    "deploy": command_deploy,
}


def main(argv: list[str] | None = None) -> int:
    # the embedded Prefect server must not try to phone home from an offline machine
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["deploy"]:  # its own parser, options and --help included
        args = argparse.Namespace(command="deploy", arguments=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"olivepress: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("olivepress: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failure we did not foresee: one paragraph, not a bare traceback
        print(
            f"olivepress {args.command} failed: {type(error).__name__}: {error}\n"
            "This is not a problem with your input that olivepress recognised; set OLIVEPRESS_DEBUG=1 "
            "for the full traceback.",
            file=sys.stderr,
        )
        if os.environ.get("OLIVEPRESS_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
