"""The Ollama Modelfile written beside ``model.gguf``: ``ollama create NAME -f Modelfile``.

It carries what Ollama cannot guess from the GGUF and users of other tools most often get wrong:

- ``TEMPLATE``: the run's chat template (:class:`~medassist.export.chat.ChatShape`) in Go
  template syntax, over ``.Messages`` like Ollama's own templates, every literal written as a
  quoted Go string so that whitespace trimming never eats a template's newlines;
- ``SYSTEM``: the system prompt ``medassist serve`` uses for this run;
- ``PARAMETER stop``: the text of every token generation stops at, and the token that opens
  a turn (a model that skips its end-of-turn token stops before writing a new turn);
- the decoding defaults of ``medassist serve`` (greedy, no repetition penalty), so Ollama's
  answers are the ones ``evaluate`` scored;
- the medical disclaimer, as comments.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from medassist.export.chat import ChatShape, TemplateError


def _go(text: str) -> str:
    """``text`` as a Go template action that prints it (a quoted Go string; JSON's escapes
    are Go's, and ``ensure_ascii=False`` avoids JSON's surrogate pairs, which Go rejects)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def go_template(shape: ChatShape) -> str:
    """The Ollama TEMPLATE that renders conversations as ``shape`` does. As in Ollama's own
    templates, a last assistant message is left open (no suffix) for the model to continue."""
    lines = []
    if shape.no_system_prefix:
        lines.append('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                     + _go(shape.no_system_prefix) + "{{ end }}")
    lines += [
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq .Role "system" }}' + _go(shape.system_prefix) + "{{ .Content }}" + _go(shape.system_suffix),
        '{{- else if eq .Role "user" }}' + _go(shape.user_prefix) + "{{ .Content }}" + _go(shape.user_suffix),
        '{{- else if eq .Role "assistant" }}' + _go(shape.assistant_prefix) + "{{ .Content }}"
        + "{{ if not $last }}" + _go(shape.assistant_suffix) + "{{ end }}",
        "{{- end }}",
        '{{- if and $last (ne .Role "assistant") }}' + _go(shape.generation_prompt) + "{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(lines)


@dataclass
class Modelfile:
    """The parts of a Modelfile medassist writes and checks."""

    template: str
    system: str | None
    stop: list[str]
    parameters: dict[str, str] = field(default_factory=dict)
    source: str = "./model.gguf"
    comments: list[str] = field(default_factory=list)

    def text(self) -> str:
        for name, value in (("TEMPLATE", self.template), ("SYSTEM", self.system or "")):
            if '"""' in value:
                raise TemplateError(f'the {name.lower()} contains """, which a Modelfile cannot quote')
        lines = [f"# {c}".rstrip() for c in self.comments]
        lines += [f"FROM {self.source}", f'TEMPLATE """{self.template}"""']
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in self.stop]
        lines += [f"PARAMETER {k} {v}" for k, v in self.parameters.items()]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> Path:
        path = Path(folder) / "Modelfile"
        path.write_text(self.text(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> "Modelfile":
        """Parse a Modelfile as medassist writes it (triple-quoted blocks, one PARAMETER a line)."""
        text = Path(path).read_text(encoding="utf-8")
        blocks = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, flags=re.M | re.S))
        rest = re.sub(r'^(TEMPLATE|SYSTEM) """.*?"""', "", text, flags=re.M | re.S)
        source, stop, params, comments = "", [], {}, []
        for line in rest.splitlines():
            if line.startswith("#"):
                comments.append(line[1:].strip())
            elif line.startswith("FROM "):
                source = line[5:].strip()
            elif line.startswith("PARAMETER "):
                key, _, value = line[10:].strip().partition(" ")
                value = json.loads(value) if value.startswith('"') else value
                if key == "stop":
                    stop.append(value)
                else:
                    params[key] = value
        return cls(blocks.get("TEMPLATE", ""), blocks.get("SYSTEM"), stop, params, source, comments)


def modelfile(shape: ChatShape, system_prompt: str | None, stop: list[str], parameters: dict[str, str],
              name: str, disclaimer: str, header: str) -> Modelfile:
    """The Modelfile for a model whose GGUF sits beside it as ``model.gguf``."""
    comments = [header, f"Create and chat:  ollama create {name} -f Modelfile  &&  ollama run {name}", ""]
    comments += textwrap.wrap(disclaimer, 92) + [""]
    comments += ["TEMPLATE: the chat template the model was trained with (tokenizer.chat_template in model.gguf),",
                 "in Go template syntax. SYSTEM: the system prompt `medassist serve` uses. PARAMETER stop: every",
                 "token generation stops at. The other parameters are medassist serve's decoding defaults.", ""]
    return Modelfile(go_template(shape), system_prompt, stop, parameters, comments=comments)
