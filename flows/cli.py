"""The `olivepress` command: run the flow, validate a data file, chat with an exported model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import get_args, get_origin

from olivepress.config import DATASET_NAME, TARGETS, load_config, setting_field, setting_fields
from olivepress.errors import UserError

# The named flags of `run` are shortcuts for these settings; every other setting is reachable with --set.
RUN_FLAGS = {
    "--model": "model",
    "--data": "data",
    "--device": "device",
    "--target": "targets",
    "--max-steps": "finetune.max_steps",
    "--calibration-samples": "quantize.calibration_samples",
    "--output": "output",
    "--registry": "registry.path",
}
VALIDATE_FLAGS = {"--min-chars": "validation.min_chars", "--max-chars": "validation.max_chars"}


def shown(value: object) -> str:
    """A default as it would be written in the config file or after --set."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def describe(dotted: str) -> str:
    """A setting's --help text: its description in the config, and its default."""
    info = setting_field(dotted)
    default = shown(info.get_default(call_default_factory=True))
    return f"{info.description} [setting {dotted}, default {default}]".replace("%", "%%")


def settings_epilog(prefix: str = "") -> str:
    """Every setting (under ``prefix``) with its default and description, for --help: --set's reference."""
    lines = [
        "settings for --set SECTION.FIELD=VALUE (the config file's keys; VALUE is YAML: 3, 0.5, true, "
        "null, [a, b]):"
    ]
    for dotted, info in setting_fields():
        if not dotted.startswith(prefix):
            continue
        lines.append(f"  {dotted} = {shown(info.get_default(call_default_factory=True))}")
        lines += textwrap.wrap(
            info.description or "", width=100, initial_indent=" " * 6, subsequent_indent=" " * 6
        )
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """--config, --set and the named flags, each flag's help taken from its setting's description."""
    parser.add_argument("--config", type=Path, help="YAML run config; the flags and --set override it")
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set any setting (repeatable; applied after --config and the flags, the last one winning), "
        "e.g. --set finetune.learning_rate=1e-4 --set gate.min_rouge_l=0.2",
    )
    for flag, dotted in flags.items():
        info = setting_field(dotted)
        kinds = get_args(info.annotation)
        options: dict = {"dest": dotted.replace(".", "__"), "help": describe(dotted), "metavar": "PATH"}
        if dotted == "data":  # repeatable: FILE, or NAME=PATH once per dataset (see data_overrides)
            options.update(
                action="append",
                metavar="FILE|NAME=PATH",
                help=f"{describe(dotted)}; NAME=PATH, repeated, names several datasets (setting datasets)",
            )
        elif info.annotation is int:
            options.update(type=int, metavar="N")
        elif get_origin(info.annotation) is list and kinds and get_args(kinds[0]):  # list of a Literal
            options.update(
                action="append",
                choices=get_args(kinds[0]),
                metavar=None,
                help=f"{describe(dotted)}; repeat the flag for several",
            )
        elif kinds and all(isinstance(kind, str) for kind in kinds):  # a Literal of names: argparse choices
            options.update(choices=kinds, metavar=None)
        parser.add_argument(flag, **options)


def config_from(args: argparse.Namespace, flags: dict[str, str], **fixed):
    """The RunConfig that --config, the named flags, --set and ``fixed`` settings describe."""
    overrides = {dotted: getattr(args, dotted.replace(".", "__")) for dotted in flags.values()}
    if "data" in overrides:
        overrides.update(data_overrides(overrides.pop("data")))
    return load_config(args.config, {**overrides, **fixed}, args.assignments)


def data_overrides(values: list[str] | None) -> dict[str, object]:
    """``--data FILE`` (one dataset) or ``--data NAME=PATH ...`` (setting ``datasets``), not both; a value
    is NAME=PATH when what precedes its first ``=`` is a dataset name, a path otherwise."""
    if not values:
        return {}
    named = [value.partition("=") for value in values if DATASET_NAME.fullmatch(value.partition("=")[0])]
    if not named:
        if len(values) > 1:
            raise UserError("--data FILE takes one file; for several datasets give --data NAME=PATH for each")
        return {"data": values[0]}
    if len(named) < len(values):
        raise UserError("--data: give one FILE, or NAME=PATH for every dataset, not both forms")
    datasets: dict[str, str] = {}
    for name, _, path in named:
        if name in datasets:
            raise UserError(f"--data: the dataset name {name!r} is given twice")
        datasets[name] = path
    return {"datasets": datasets}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olivepress",
        description="Hugging Face causal LM + JSONL of prompt/response pairs → 4-bit ONNX Runtime GenAI model "
        "with a switchable LoRA adapter, as one Prefect flow run.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="validate, quantize (AWQ), fine-tune (LoRA), export to ONNX, evaluate the gate, register",
        epilog=settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(run, RUN_FLAGS)
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the libraries' output (progress bars, training logs, Prefect's lines) live; it always goes "
        "to run.log in the run folder",
    )

    validate = commands.add_parser(
        "validate",
        help="check a JSONL file; exit 1 with one line per bad line",
        description=textwrap.fill(
            "Check a JSONL file with the validation settings a run would use: --config's validation section, "
            "then the flags, then --set validation.FIELD=VALUE. The whole config is checked as run checks it, "
            "FILE standing in for its data.",
            width=100,
        ),
        epilog=settings_epilog("validation."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("file", type=Path, help="JSON Lines file of {prompt, response} pairs")
    add_config_arguments(validate, VALIDATE_FLAGS)

    chat = commands.add_parser("chat", help="generate from an exported model, streaming, with tokens/s")
    chat.add_argument(
        "model_dir",
        type=Path,
        help="a folder of targets (a run folder's onnx/, a registry entry's model/, or the run folder or "
        "entry itself), or one target's export folder (onnx/cpu; an older run's onnx/)",
    )
    chat.add_argument(
        "--target",
        choices=TARGETS,
        help="which target's export to run (default: cuda when MODEL_DIR has it and this machine shows a "
        "CUDA device and has onnxruntime-genai's CUDA build, else cpu)",
    )
    switch = chat.add_mutually_exclusive_group()
    switch.add_argument(
        "--adapter",
        help="a .onnx_adapter file, or an adapter's name: adapters/TARGET/NAME.onnx_adapter of the run "
        "folder or registry entry (one per dataset that passed on that target) (default: the export's own)",
    )
    switch.add_argument("--no-adapter", action="store_true", help="run the quantized base without LoRA")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument(
        "prompt",
        nargs="?",
        help="what to answer; without it, a session reads prompts line by line from standard input "
        "('/adapter FILE|NAME', '/adapter off' or '/adapter auto' switches the adapter; '/quit' ends)",
    )

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
    config = config_from(args, RUN_FLAGS)
    os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")  # Prefect's lines go to run.log: no color codes
    from olivepress.flows.pipeline import new_run_dir, olivepress_flow, run_folder
    from olivepress.run_log import LOG_FILE, run_output

    run_dir = new_run_dir(config)
    print(f"olivepress: run folder {run_dir} (library output: {LOG_FILE} there)", flush=True)
    with run_output(run_dir, verbose=args.verbose), run_folder(run_dir):
        result = olivepress_flow(config)
    print()
    print(run_summary(result))
    return 0


def run_summary(result: dict) -> str:
    """What a finished run built, for the terminal: each target's export and the adapters that passed on it,
    the report, the registration, and a chat command that runs on this layout (chat picks the target that
    fits the machine; an adapter that did not pass on every target names the target it did pass on)."""
    exports, adapters = result["exports"], result["adapters"]
    lines = [f"ONNX Runtime GenAI models: {result['onnx']}"]
    for target, export in exports.items():
        lines.append(f"  {target}: {export}")
        lines += [f"    adapter {name}: {path}" for name, path in adapters.get(target, {}).items()]
    lines.append(f"Report: {result['report']}")
    registration = result["registration"]
    lines.append(
        f"Registered: {registration['name']} version {registration['version']} ({registration['uri']})"
    )
    names = list(dict.fromkeys(name for named in adapters.values() for name in named))
    everywhere = [name for name in names if all(name in adapters.get(target, {}) for target in exports)]
    choice = ""
    if names:  # an adapter every target has, else one target's (named, so chat does not pick another)
        name = (everywhere or names)[0]
        choice = f" --adapter {name}"
        if not everywhere:
            choice = f" --target {next(t for t, named in adapters.items() if name in named)}{choice}"
    lines.append(
        f'Try it: olivepress chat {result["onnx"]}{choice} "What should I pack for a week in Lisbon?"'
    )
    return "\n".join(lines)


def command_validate(args: argparse.Namespace) -> int:
    from olivepress.tasks.validate import validate_jsonl

    # The whole config is checked as `run` would check it; FILE stands in for its data (a missing FILE is
    # left to validate_jsonl, which says so in its own words).
    config = config_from(args, VALIDATE_FLAGS, data=args.file if args.file.is_file() else None)
    settings = config.validation
    report = validate_jsonl(args.file, min_chars=settings.min_chars, max_chars=settings.max_chars)
    for issue in report.warnings:
        print(f"warning: line {issue.line}: {issue.reason}", file=sys.stderr)
    if not report.ok:
        print(report.to_text(), file=sys.stderr)
        return 1
    print(f"{args.file}: {report.n_records} valid records")
    return 0


def command_chat(args: argparse.Namespace) -> int:
    from olivepress.chat import chat, chat_session

    adapter = None if args.no_adapter else (args.adapter or "auto")
    if args.prompt is None:
        chat_session(
            args.model_dir,
            sys.stdin,
            adapter=adapter,
            max_new_tokens=args.max_new_tokens,
            show_prompt=sys.stdin.isatty(),
            target=args.target,
        )
    else:
        chat(
            args.model_dir,
            args.prompt,
            adapter=adapter,
            max_new_tokens=args.max_new_tokens,
            target=args.target,
        )
    return 0


def command_models(args: argparse.Namespace) -> int:
    config = load_config(args.config, {"registry.path": args.registry})
    if config.registry.backend == "azureml":
        from olivepress.registry.azureml import list_azureml

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
    """A local entry as a listing row: the targets that passed, then the fine-tuned variant's metrics against
    the base's (the first passing adapter's on its first passing target), formatted from the lineage's raw
    metrics (an entry registered before lineage kept raw metrics holds display rows: read as is; one
    registered before targets has no ``targets``: "-")."""
    from olivepress.metrics_display import readable

    metrics = {row["variant"]: readable(row) for row in entry.lineage.get("metrics", [])}
    tuned, base = metrics.get("fine-tuned", {}), metrics.get("base", {})
    return {
        "name": entry.name,
        "version": entry.version,
        "registered": entry.lineage.get("registered_at", "-"),
        "targets": ",".join(entry.lineage.get("targets") or {}) or "-",
        "perplexity": f"{tuned.get('perplexity', '-')} (base {base.get('perplexity', '-')})",
        "tok/s": f"{tuned.get('decode_tok_s', '-')} (base {base.get('decode_tok_s', '-')})",
        "MB": f"{tuned.get('size_mb', '-')} (base {base.get('size_mb', '-')})",
        "data": entry.lineage.get("data", {}).get("sha256", "-")[:12],
        # its adapters by name (lineage adapters: {name: {"data", "targets": {...}}}; the metrics above are
        # the first one's)
        "adapters": ",".join(entry.lineage.get("adapters") or {}) or "-",
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


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that chat's PROMPT may follow its options: argparse matches an optional
    positional together with the one before it (MODEL_DIR), so a prompt after an option is left over."""
    args, left_over = parser.parse_known_args(argv)
    if args.command == "chat" and args.prompt is None and len(left_over) == 1 and left_over[0][:1] != "-":
        args.prompt = left_over.pop()
    if left_over:
        parser.error(f"unrecognized arguments: {' '.join(left_over)}")
    return args


def main(argv: list[str] | None = None) -> int:
    # the embedded Prefect server must not try to phone home from an offline machine
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["deploy"]:  # its own parser, options and --help included
        args = argparse.Namespace(command="deploy", arguments=argv[1:])
    else:
        args = parse_arguments(build_parser(), argv)
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
