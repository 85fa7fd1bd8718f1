"""The chat template a run was trained with, and its shape.

Training builds prompts with the tokenizer's Jinja chat template, or with medassist's plain
``Question: ... Answer:`` format (:mod:`medassist.formatting`). Every export carries that one
template: the tokenizer folder as it is, the GGUF as ``tokenizer.chat_template`` (the plain
format written as the equivalent Jinja template, :data:`PLAIN_CHAT_TEMPLATE`), and the Ollama
Modelfile translated to Go template syntax (:mod:`medassist.export.ollama`).

The translation goes through :class:`ChatShape`: the text a template writes before and after
each role's content, found by rendering the template with marker strings in place of the
contents, then checked by rendering several conversations both ways. A template that does
something a shape cannot say (numbered turns, content-dependent branches) is refused with one
line instead of being translated wrongly, the bug users of other tools report most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from medassist.errors import MedassistError
from medassist.formatting import PromptFormat

# medassist's plain format (formatting.PLAIN_TEMPLATE, history, system prompt) as Jinja
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\\nAnswer: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
)
_MARK = "\ue000{}\ue001"  # private-use characters: never in a template's own text
_MARKS = re.compile("\ue000[^\ue001]*\ue001")


class TemplateError(MedassistError):
    """A chat template that cannot be carried to another runtime exactly."""


def training_template(fmt: PromptFormat) -> str:
    """The Jinja chat template behind ``fmt``'s prompts (the plain format's equivalent if it
    uses none)."""
    if not fmt.uses_chat_template:
        return PLAIN_CHAT_TEMPLATE
    template = fmt.tokenizer.chat_template
    if not isinstance(template, str):
        raise TemplateError("the tokenizer has several named chat templates; medassist exports a single one")
    return template


def render(fmt: PromptFormat, template: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """``messages`` rendered by ``template`` as the tokenizer renders it (its bos/eos names bound)."""
    try:
        return fmt.tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - a template's own raise_exception() or a Jinja error
        raise TemplateError(f"the chat template fails on a {'/'.join(m['role'] for m in messages)} "
                            f"conversation ({type(exc).__name__}: {exc})"[:300]) from None


@dataclass(frozen=True)
class ChatShape:
    """What a chat template writes around each message.

    ``no_system_prefix`` is written before the first message when it is not a system message:
    where a template inserts its own default system turn (SmolLM2's does).
    """

    no_system_prefix: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        out = "" if messages and messages[0]["role"] == "system" else self.no_system_prefix
        for m in messages:
            role = m["role"]
            out += getattr(self, f"{role}_prefix") + m["content"] + getattr(self, f"{role}_suffix")
        if add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
            out += self.generation_prompt
        return out

    # the conversations a derived shape must render exactly as the template does
    PROBES = (
        (("user",), True), (("system", "user"), True), (("user", "assistant", "user"), True),
        (("system", "user", "assistant", "user", "assistant", "user"), True),
        (("system", "user", "assistant"), False),
    )

    @classmethod
    def of(cls, fmt: PromptFormat, template: str | None = None) -> "ChatShape":
        """The shape of ``template`` (default: the one ``fmt`` trained with), checked on
        :attr:`PROBES`; :class:`TemplateError` when no shape renders it exactly."""
        template = template if template is not None else training_template(fmt)

        def show(roles: Sequence[str], gen: bool) -> list[str]:
            text = render(fmt, template, _probe(roles), gen)
            pieces = _MARKS.split(text)
            if _MARKS.findall(text) != [_MARK.format(i) for i in range(len(roles))]:
                raise TemplateError(f"the chat template does not write each message of a "
                                    f"{'/'.join(roles)} conversation once, in order")
            return pieces

        p0, p1, p2, p3, p4 = show(("system", "user", "assistant", "user"), True)
        user_before, user_suffix = show(("user",), False)
        with_gen = "".join(show(("user",), True))
        generation_prompt = _after(with_gen, user_before + user_suffix)
        assistant_suffix = show(("system", "user", "assistant"), False)[-1]
        user_prefix = _after(p3, assistant_suffix)
        shape = cls(no_system_prefix=_before(user_before, user_prefix), system_prefix=p0,
                    system_suffix=_before(p1, user_prefix), user_prefix=user_prefix, user_suffix=user_suffix,
                    assistant_prefix=_after(p2, user_suffix), assistant_suffix=assistant_suffix,
                    generation_prompt=generation_prompt)
        if _before(p4, generation_prompt) != user_suffix:
            raise TemplateError("the chat template ends a conversation differently from a turn")
        for roles, gen in cls.PROBES:
            messages = _probe(roles, real=True)
            want, got = render(fmt, template, messages, gen), shape.render(messages, gen)
            if want != got:
                raise TemplateError(f"the chat template cannot be written as fixed text around each message: a "
                                    f"{'/'.join(roles)} conversation renders {want!r}, the shape {got!r}"[:400])
        return shape


def _probe(roles: Sequence[str], real: bool = False) -> list[dict[str, str]]:
    text = {"system": "Be careful.", "user": "What causes anemia?", "assistant": "Low iron, among others."}
    return [{"role": r, "content": f"{text[r]} ({i})" if real else _MARK.format(i)} for i, r in enumerate(roles)]


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise TemplateError(f"the chat template writes {text!r} where {prefix!r} was expected"[:300])
    return text[len(prefix):]


def _before(text: str, suffix: str) -> str:
    if not text.endswith(suffix):
        raise TemplateError(f"the chat template writes {text!r} where it should end with {suffix!r}"[:300])
    return text[: len(text) - len(suffix)]


def end_of_turn(fmt: PromptFormat, template: str | None = None) -> int | None:
    """The token id the template ends an assistant turn with (the first token after the
    answer), or None when it ends with plain text only."""
    suffix = ChatShape.of(fmt, template).assistant_suffix
    ids = fmt.tokenizer(suffix, add_special_tokens=False).input_ids if suffix else []
    special = set(fmt.tokenizer.all_special_ids)
    return ids[0] if ids and ids[0] in special else None
