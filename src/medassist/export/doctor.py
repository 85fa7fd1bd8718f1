"""One template from training to serving: the checks behind ``medassist doctor``.

A model fine-tuned well still answers badly when the prompt or the stop token at inference
differs from training, the complaint users of every fine-tuning tool file most. These checks
compare the places that must agree, each failure one line naming the two values:

:func:`check_run` (``doctor RUN``; run by ``export``, and by ``serve`` at start-up):

- ``eos-masked``: the training batch (the formatter's ``collate``) labels the answer's EOS
  -100, as a collator that masks the pad id does when pad == EOS: the model never learns to stop;
- ``mask-end``: the answer-only mask does not end on the EOS, or the EOS is not the token the
  chat template ends an assistant turn with;
- ``serve-prompt``: the prompt ``serve``/``chat`` build (system prompt, template, tokens)
  differs from the one training used.

:func:`check_export` (``doctor EXPORT``; run by ``export`` before the folder is moved into place):

- ``generation-config``, ``gguf``, ``modelfile``: the stop tokens of ``generation_config.json``,
  ``model.gguf`` and the ``Modelfile`` miss a token the tokenizer ends answers or turns with; the
  GGUF's chat template, EOS/pad ids, BOS flag, system prompt or tokenizer differ from the
  tokenizer's; the Modelfile's TEMPLATE or SYSTEM differ from the template and system prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medassist.errors import MedassistError
from medassist.formatting import IGNORE_INDEX, PromptFormat

QUESTION = "What are the symptoms of anemia?"
ANSWERS = ("Tiredness.", "Tiredness, weakness, pale skin, shortness of breath and cold hands and feet.")


@dataclass(frozen=True)
class Problem:
    """One disagreement: ``check`` names the check, ``message`` the two values."""

    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"


# ---------------------------------------------------------------------------------------
# helpers
def serve_format(loaded) -> PromptFormat:
    """The formatter ``medassist serve``/``chat`` build for ``loaded`` (its default system prompt)."""
    from medassist.serving.assistant import Assistant

    return Assistant(loaded).fmt


def adds_bos(fmt: PromptFormat) -> bool:
    """Whether prompts start with a BOS the tokenizer adds (not one the template writes)."""
    bos = fmt.tokenizer.bos_token_id
    text_ids = fmt.tokenizer(fmt.prompt_text(QUESTION), add_special_tokens=False).input_ids
    return bos is not None and fmt.prompt_ids(QUESTION) == [bos] + text_ids


def _tok(tokenizer, token_id: int | None) -> str:
    if token_id is None:
        return "none"
    return f"{tokenizer.decode([token_id], skip_special_tokens=False)!r} ({token_id})"


def _toks(tokenizer, ids) -> str:
    return "[" + ", ".join(_tok(tokenizer, i) for i in ids) + "]"


def _short(text: str | None, limit: int = 70) -> str:
    if text is None:
        return "none"
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _template_name(fmt: PromptFormat) -> str:
    if not fmt.uses_chat_template:
        return "the plain 'Question: … Answer:' format"
    digest = hashlib.sha256(str(fmt.tokenizer.chat_template).encode()).hexdigest()[:8]
    return f"the tokenizer's chat template ({digest})"


def _first_difference(a: str, b: str, around: int = 30) -> tuple[str, str]:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, i - around // 2)
    return a[start: i + around], b[start: i + around]


# ---------------------------------------------------------------------------------------
# the run
def _loaded(run_or_loaded):
    from medassist.models import LoadedModel, load_for_inference
    from medassist.rundir import RunDir

    if isinstance(run_or_loaded, LoadedModel):
        return run_or_loaded
    path = run_or_loaded.path if isinstance(run_or_loaded, RunDir) else Path(run_or_loaded)
    if RunDir.find(path) is None:
        raise MedassistError(f"{path}: not a finished medassist run (needs config.yaml and final/)")
    return load_for_inference(str(path))


def training_format(loaded) -> PromptFormat | None:
    """The formatter ``loaded`` was trained with: its run's config, or the config an export
    recorded (``medassist_export.json``); None when nothing says."""
    cfg = loaded.config
    info_file = Path(loaded.source or ".") / "medassist_export.json"
    if cfg is None and loaded.source and info_file.is_file():
        from medassist.config import TrainConfig

        recorded = json.loads(info_file.read_text(encoding="utf-8")).get("train_config")
        cfg = TrainConfig.model_validate(recorded) if recorded else None
    return loaded.family.make_format(loaded.tokenizer, cfg) if cfg is not None else None


def check_run(run_or_loaded, serve_fmt: PromptFormat | None = None) -> list[Problem]:
    """Problems of a run (a run directory, :class:`~medassist.rundir.RunDir` or a loaded
    model). ``serve_fmt``: the formatter the server uses (default: what ``serve`` builds)."""
    loaded = _loaded(run_or_loaded)
    trained = training_format(loaded)
    fmt = trained or loaded.format()
    problems = eos_in_loss(fmt) + mask_end(fmt)
    if trained is not None:
        problems += serve_prompt(trained, serve_fmt or serve_format(loaded))
    return problems


def eos_in_loss(fmt: PromptFormat) -> list[Problem]:
    """The answer's EOS keeps its label in a padded training batch."""
    encoded = [fmt.encode(QUESTION, answer) for answer in ANSWERS]
    batch = fmt.collate([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])
    for row, enc in enumerate(encoded):
        ends = [i for i, label in enumerate(enc.labels) if label == fmt.eos_id]
        if ends and int(batch["labels"][row, ends[-1]]) != fmt.eos_id:
            tok = fmt.tokenizer
            why = (f"the pad token {_tok(tok, fmt.pad_id)} equals the EOS {_tok(tok, fmt.eos_id)}" if fmt.pad_id == fmt.eos_id
                   else f"the EOS is {_tok(tok, fmt.eos_id)}")
            return [Problem("eos-masked", f"{why} and the training batch labels it {int(batch['labels'][row, ends[-1]])}, "
                                          f"not {fmt.eos_id}: the model never learns to stop")]
    return []


def mask_end(fmt: PromptFormat) -> list[Problem]:
    """The answer-only mask ends on the EOS, and that is the template's end-of-turn token."""
    from medassist.export.chat import TemplateError, end_of_turn

    enc = fmt.encode(QUESTION, ANSWERS[0])
    trained = [label for label in enc.labels if label != IGNORE_INDEX]
    last = trained[-1] if trained else None
    tok = fmt.tokenizer
    if last != fmt.eos_id:
        return [Problem("mask-end", f"the answer-only mask ends on {_tok(tok, last)}, not on the EOS {_tok(tok, fmt.eos_id)}")]
    if not fmt.uses_chat_template:
        return []
    try:
        turn_end = end_of_turn(fmt)
    except TemplateError as exc:
        return [Problem("mask-end", str(exc))]
    if turn_end is not None and turn_end != last:
        return [Problem("mask-end", f"the answer-only mask ends on {_tok(tok, last)}, but the chat template ends an "
                                    f"assistant turn with {_tok(tok, turn_end)}")]
    return []


def serve_prompt(trained: PromptFormat, serve: PromptFormat) -> list[Problem]:
    """``serve`` builds the prompt training built: same system prompt, template and tokens."""
    problems = []
    if (trained.system_prompt or None) != (serve.system_prompt or None):
        used = _short(trained.system_prompt)
        if trained.system_prompt is None and trained.uses_chat_template:
            from medassist.export.chat import ChatShape, TemplateError

            try:
                default = ChatShape.of(trained).no_system_prefix
            except TemplateError:
                default = ""
            used += f" (the chat template writes its own: {_short(default)})" if default else ""
        problems.append(Problem("serve-prompt", f"system prompt: training used {used}, serve uses "
                                                f"{_short(serve.system_prompt)}"))
    if (trained.uses_chat_template != serve.uses_chat_template
            or trained.uses_chat_template and trained.tokenizer.chat_template != serve.tokenizer.chat_template):
        problems.append(Problem("serve-prompt", f"prompt template: training used {_template_name(trained)}, serve uses "
                                                f"{_template_name(serve)}"))
    if not problems:
        want, got = trained.prompt_ids(QUESTION), serve.prompt_ids(QUESTION)
        if want != got:
            a, b = _first_difference(trained.tokenizer.decode(want), serve.tokenizer.decode(got))
            problems.append(Problem("serve-prompt", f"prompt tokens: training renders …{a!r}…, serve renders …{b!r}…"))
    return problems


# ---------------------------------------------------------------------------------------
# an export
def read_export(folder: str | Path) -> tuple[dict[str, Any], PromptFormat]:
    """(``medassist_export.json``, the training formatter on the export's own tokenizer)."""
    from transformers import AutoTokenizer

    from medassist.config import TrainConfig
    from medassist.export.hf import EXPORT_INFO
    from medassist.families import get_family

    folder = Path(folder)
    if not (folder / EXPORT_INFO).is_file():
        raise MedassistError(f"{folder}: not a medassist export (no {EXPORT_INFO}) and not a finished run")
    info = json.loads((folder / EXPORT_INFO).read_text(encoding="utf-8"))
    family = get_family(info.get("model_type") or "decoder")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    family.prepare(None, tokenizer)
    cfg = TrainConfig.model_validate(info["train_config"]) if info.get("train_config") else None
    return info, family.make_format(tokenizer, cfg)


def check_export(folder: str | Path, serve: bool = False) -> list[Problem]:
    """Problems of an export folder: its stop tokens, template and system prompt against its
    tokenizer. ``serve``: also compare ``medassist serve --model FOLDER``'s prompt with training's."""
    from medassist.export.chat import TemplateError, end_of_turn

    folder = Path(folder)
    info, fmt = read_export(folder)
    tok = fmt.tokenizer
    required = [fmt.eos_id]
    try:
        turn_end = end_of_turn(fmt) if fmt.uses_chat_template else None
    except TemplateError as exc:
        return [Problem("template", str(exc))]
    if turn_end is not None and turn_end not in required:
        required.append(turn_end)

    problems: list[Problem] = []
    generation_eos: list[int] = []
    if (folder / "generation_config.json").is_file():
        raw = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        generation_eos = [int(i) for i in (raw if isinstance(raw, list) else [raw]) if i is not None]
        missing = [i for i in required if i not in generation_eos]
        if missing:
            problems.append(Problem("generation-config", f"generation_config.json stops at {_toks(tok, generation_eos)}, "
                                                         f"the tokenizer ends answers with {_toks(tok, missing)}"))
    ends = required + [i for i in generation_eos if i not in required]
    if (folder / "model.gguf").is_file():
        problems += _check_gguf(folder / "model.gguf", fmt, ends, info)
    if (folder / "Modelfile").is_file():
        problems += _check_modelfile(folder, fmt, ends, info)
    if serve and info.get("kind") != "adapter":
        from medassist.models import load_for_inference

        loaded = load_for_inference(str(folder))
        problems += serve_prompt(fmt, serve_format(loaded))
    return problems


def _check_gguf(path: Path, fmt: PromptFormat, ends: list[int], info: dict[str, Any]) -> list[Problem]:
    from medassist.export.chat import training_template
    from medassist.export.gguf import SYSTEM_PROMPT_KEY, read_metadata

    tok, meta, problems = fmt.tokenizer, read_metadata(path), []
    template = meta.get("tokenizer.chat_template")
    if template != training_template(fmt):
        a, b = _first_difference(str(template), training_template(fmt))
        problems.append(Problem("gguf", f"model.gguf's chat template has …{a!r}…, the training template …{b!r}…"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos != fmt.eos_id:
        problems.append(Problem("gguf", f"model.gguf's EOS is {eos}, the tokenizer's EOS is {_tok(tok, fmt.eos_id)}"))
    elif meta["tokenizer.ggml.tokens"][eos] != tok.convert_ids_to_tokens(eos):
        problems.append(Problem("gguf", f"model.gguf's token {eos} is {meta['tokenizer.ggml.tokens'][eos]!r}, the "
                                        f"tokenizer's {_tok(tok, eos)}"))
    gguf_ends = [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom") if f"tokenizer.ggml.{k}_token_id" in meta]
    missing = [i for i in ends if i not in gguf_ends]
    if missing:
        problems.append(Problem("gguf", f"model.gguf stops at {_toks(tok, gguf_ends)}, the tokenizer and "
                                        f"generation_config.json at {_toks(tok, ends)}"))
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad != fmt.pad_id:
        problems.append(Problem("gguf", f"model.gguf's pad token is {pad}, the tokenizer's {_tok(tok, fmt.pad_id)}"))
    if bool(meta.get("tokenizer.ggml.add_bos_token", False)) != adds_bos(fmt):
        problems.append(Problem("gguf", f"model.gguf add_bos_token is {meta.get('tokenizer.ggml.add_bos_token')}, but "
                                        f"training prompts {'start' if adds_bos(fmt) else 'do not start'} with an added BOS"))
    if meta.get(SYSTEM_PROMPT_KEY) != info.get("system_prompt"):
        problems.append(Problem("gguf", f"model.gguf's system prompt is {_short(meta.get(SYSTEM_PROMPT_KEY))}, serve's "
                                        f"{_short(info.get('system_prompt'))}"))
    return problems + _check_gguf_tokenizer(path, fmt)


def _check_gguf_tokenizer(path: Path, fmt: PromptFormat) -> list[Problem]:
    """The tokenizer a GGUF describes splits a prompt and an answer as the tokenizer does."""
    from transformers import AutoTokenizer

    text = fmt.prompt_text(QUESTION) + ANSWERS[1] + " 120/80 mmHg, 3.5 mg; naïve café 👍"
    from medassist.export.gguf import alone

    want = fmt.tokenizer(text, add_special_tokens=False).input_ids
    with alone(path) as folder:
        got = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)(text, add_special_tokens=False).input_ids
    if got != want:
        k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        return [Problem("gguf", f"model.gguf's tokenizer splits {text!r}"[:120] + f" into {got[k:k + 4]} at token {k}, "
                                f"the tokenizer into {want[k:k + 4]}")]
    return []


def _check_modelfile(folder: Path, fmt: PromptFormat, ends: list[int], info: dict[str, Any]) -> list[Problem]:
    from medassist.export.chat import ChatShape
    from medassist.export.ollama import Modelfile, go_template

    tok, mf, problems = fmt.tokenizer, Modelfile.read(folder / "Modelfile"), []
    if not (folder / mf.source).is_file():
        problems.append(Problem("modelfile", f"Modelfile FROM {mf.source}, but there is no such file beside it"))
    want = [tok.decode([i], skip_special_tokens=False) for i in ends]
    missing = [s for s in want if s not in mf.stop]
    if missing:
        problems.append(Problem("modelfile", f"Modelfile stops at {mf.stop}, the tokenizer and generation_config.json "
                                             f"at {want}"))
    expected = go_template(ChatShape.of(fmt))
    if mf.template != expected:
        a, b = _first_difference(mf.template, expected)
        problems.append(Problem("modelfile", f"Modelfile TEMPLATE has …{a!r}…, the training template (as Go) …{b!r}…"))
    if (mf.system or None) != (info.get("system_prompt") or None):
        problems.append(Problem("modelfile", f"Modelfile SYSTEM is {_short(mf.system)}, serve's system prompt "
                                             f"{_short(info.get('system_prompt'))}"))
    return problems
