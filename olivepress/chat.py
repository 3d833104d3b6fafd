"""Chat with an exported model from the terminal: a prompt in, the answer streamed out, then its speed; or a
session of prompts line by line, switching adapters between them.

A run builds one export per target (``onnx/<target>/`` in the run folder, ``model/<target>/`` in a registry
entry), so what chat is given may be one export folder or a folder of targets; :func:`resolve_target`
turns either into the export folder it runs and the target that folder was built for."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from olivepress.config import DATASET_NAME, TARGETS
from olivepress.errors import UserError
from olivepress.genai import (
    ADAPTER_FILE,
    GENAI_CONFIG,
    GenerationStats,
    LoadedModel,
    open_model,
    prompt_token_ids,
    stream_generate,
)
from olivepress.prompts import load_prompt_format
from olivepress.registry import ADAPTER_SUFFIX, ADAPTERS_DIR

AUTO = "auto"
SWITCH = "/adapter"
QUIT = "/quit"
# Where a folder of targets sits inside what a user may name instead: a run folder, a registry entry.
TARGETS_FOLDERS = ("onnx", "model")


@dataclass(frozen=True)
class Export:
    """The export folder chat runs and the target it was built for (None: a lone export folder whose name is
    no target, such as one exported before targets existed)."""

    folder: Path
    target: str | None = None

    def adapter_places(self) -> list[Path]:
        """Folders that may hold named adapters, most specific first: ``adapters/<target>/`` beside the
        folder of targets (a run folder's or a registry entry's, every adapter that passed on that target),
        then the places of exports from before targets: ``adapters/`` beside the export and inside it."""
        places = [self.folder.parent.parent / ADAPTERS_DIR / self.target] if self.target else []
        return [*places, self.folder.parent / ADAPTERS_DIR, self.folder / ADAPTERS_DIR]

    def describe(self) -> str:
        """The first line of chat's output: which build answers (a cpu and a cuda export differ in speed and,
        slightly, in their answers)."""
        return f"[target {self.target}: {self.folder}]\n" if self.target else f"[{self.folder}]\n"


def targets_in(folder: Path) -> list[str]:
    """The targets ``folder`` holds an export of (``<target>/genai_config.json``), in TARGETS' order."""
    return [target for target in TARGETS if (folder / target / GENAI_CONFIG).is_file()]


def machine_runs_cuda() -> bool:
    """A CUDA device is visible and the installed ONNX Runtime GenAI has the CUDA provider: both are needed
    to run a cuda export (the CPU build of onnxruntime-genai cannot load it)."""
    from olivepress.devices import cuda_visible, genai_has_cuda

    return genai_has_cuda() and cuda_visible()


def resolve_target(model_dir: Path, target: str | None = None) -> Export:
    """What ``model_dir`` names, as the export to run: an export folder itself (it has genai_config.json: an
    older run's onnx/ or entry's model/ keeps loading as before), or a folder of targets (a run folder's
    ``onnx/``, a registry entry's ``model/``), or a run folder or registry entry holding one of those.

    Of a folder of targets, ``target`` picks one; by default the one that fits this machine: cuda when it is
    there and this machine runs it (:func:`machine_runs_cuda`), else cpu. A chosen target that is not there
    is a UserError listing the targets that are. Paths are kept as given (not resolved), so an export
    reached through the run folder's ``onnx/<target>`` link still finds the adapters beside it."""
    if (model_dir / GENAI_CONFIG).is_file():
        named = model_dir.name if model_dir.name in TARGETS else None
        if target is not None and target != named:
            what = f"the {named} export" if named else "one export, of no target named by its folder"
            raise UserError(f"{model_dir} is {what}; --target {target} chooses among a folder of targets")
        return Export(model_dir, named)
    if not targets_in(model_dir):
        inner = next((model_dir / name for name in TARGETS_FOLDERS if (model_dir / name).is_dir()), None)
        if inner is not None:
            return resolve_target(inner, target)
    available = targets_in(model_dir)
    if not available:
        raise UserError(
            f"{model_dir} is not an ONNX Runtime GenAI model folder (no {GENAI_CONFIG}), nor a folder of "
            f"targets ({', '.join(f'{t}/' for t in TARGETS)}), nor a run folder or registry entry "
            f"holding one ({' or '.join(f'{name}/' for name in TARGETS_FOLDERS)})"
        )
    why = ""
    if target is None:
        target = "cuda" if "cuda" in available and machine_runs_cuda() else "cpu"
        if target not in available:
            why = (
                " (this machine cannot run the cuda export: that needs a visible CUDA device and "
                "onnxruntime-genai's CUDA build)"
            )
    if target not in available:
        raise UserError(f"no {target} export in {model_dir}{why}; the targets there: {', '.join(available)}")
    return Export(model_dir / target, target)


def resolve_adapter(export: Export, adapter: Path | Literal["auto"] | None) -> Path | None:
    """``"auto"``: the adapter the export wrote beside the model, if there is one; a file; or an adapter's
    name: ``<name>.onnx_adapter`` in the first of ``export``'s :meth:`Export.adapter_places` that has it."""
    if adapter == AUTO:
        candidate = export.folder / ADAPTER_FILE
        return candidate if candidate.is_file() else None
    if adapter is None:
        return None
    if Path(adapter).is_file():
        return Path(adapter)
    if DATASET_NAME.fullmatch(str(adapter)):
        places = export.adapter_places()
        for place in places:
            if (place / f"{adapter}{ADAPTER_SUFFIX}").is_file():
                return place / f"{adapter}{ADAPTER_SUFFIX}"
        names = sorted(
            {file.name.removesuffix(ADAPTER_SUFFIX) for p in places for file in p.glob(f"*{ADAPTER_SUFFIX}")}
        )
        raise UserError(
            f"no adapter file {adapter} and no adapter named '{adapter}' in {places[0]}"
            + (f" (named adapters: {', '.join(names)})" if names else "")
        )
    raise UserError(f"adapter file {adapter} does not exist")


def chat(
    model_dir: Path,
    prompt: str,
    adapter: Path | Literal["auto"] | None = AUTO,
    max_new_tokens: int = 256,
    out: TextIO | None = None,
    text_template: str | None = None,
    target: str | None = None,
) -> GenerationStats:
    """Answer ``prompt`` with the export that ``model_dir`` and ``target`` name (:func:`resolve_target`),
    formatted as in training: ``text_template``, else the one the export recorded, else the chat template.

    Streams to ``out`` (default: the current sys.stdout) after a line naming the target and folder, then one
    line with tokens/s.
    """
    out = out or sys.stdout
    export = resolve_target(model_dir, target)
    text_template = text_template if text_template is not None else load_prompt_format(export.folder)
    adapter_file = resolve_adapter(export, adapter)
    loaded = open_model(export.folder, adapter_file)
    out.write(export.describe())
    return answer(loaded, prompt, adapter_file, max_new_tokens, out, text_template)


def answer(
    loaded: LoadedModel,
    prompt: str,
    adapter_file: Path | None,
    max_new_tokens: int,
    out: TextIO,
    text_template: str | None,
) -> GenerationStats:
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    stats = stream_generate(loaded, prompt_token_ids(loaded, prompt, text_template), max_new_tokens, write)
    adapter_note = f"adapter {adapter_file.name}" if adapter_file else "no adapter"
    out.write(
        f"\n\n[{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, first token after "
        f"{stats.time_to_first_token_s:.2f} s, {adapter_note}]\n"
    )
    return stats


def chat_session(
    model_dir: Path,
    lines: Iterable[str],
    adapter: Path | Literal["auto"] | None = AUTO,
    max_new_tokens: int = 256,
    out: TextIO | None = None,
    text_template: str | None = None,
    show_prompt: bool = False,
    target: str | None = None,
) -> list[GenerationStats]:
    """Answer each line of ``lines`` as a prompt, one model (:func:`resolve_target`) for the whole session.

    ``/adapter FILE|NAME`` makes another .onnx_adapter (a file, or a named adapter of the session's target)
    active for the prompts after it, ``/adapter off`` none, ``/adapter auto`` the folder's own; ``/quit`` (or
    the end of ``lines``) ends the session. Every adapter is loaded once into one ``og.Adapters`` on one int4
    model and switched per prompt, so the folder's own adapter runs at run time here, not as its merged graph
    (on a GPU that is slower: docs/cuda-operators.md). A bad switch is reported and the session goes on with the adapter it
    had.
    """
    import onnxruntime_genai as og

    out = out or sys.stdout
    export = resolve_target(model_dir, target)
    text_template = text_template if text_template is not None else load_prompt_format(export.folder)
    plain = open_model(export.folder)
    adapters = og.Adapters(plain.model)
    loaded_files: set[str] = set()

    def select(adapter_file: Path | None) -> LoadedModel:
        if adapter_file is None:
            return plain
        name = str(adapter_file.resolve())
        if name not in loaded_files:
            adapters.load(name, name)
            loaded_files.add(name)
        return LoadedModel(model=plain.model, tokenizer=plain.tokenizer, adapters=adapters, adapter_name=name)

    adapter_file = resolve_adapter(export, adapter)
    current = select(adapter_file)
    out.write(export.describe())
    answers = []
    if show_prompt:
        out.write("> ")
        out.flush()
    for line in lines:
        text = line.strip()
        if text == QUIT:
            break
        if text == SWITCH or text.startswith(f"{SWITCH} "):
            choice = text.removeprefix(SWITCH).strip()
            try:
                chosen = (
                    None
                    if choice == "off"
                    else resolve_adapter(export, AUTO if choice == AUTO else Path(choice))
                )
                current, adapter_file = select(chosen), chosen
                out.write(f"[adapter {chosen.name if chosen else 'off'}]\n")
            except (UserError, RuntimeError) as error:
                out.write(
                    f"[{SWITCH} {choice}: {error}; still {adapter_file.name if adapter_file else 'off'}]\n"
                )
        elif text:
            answers.append(answer(current, text, adapter_file, max_new_tokens, out, text_template))
        if show_prompt:
            out.write("> ")
            out.flush()
    return answers
