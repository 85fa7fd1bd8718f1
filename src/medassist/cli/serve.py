"""``medassist generate``, ``chat`` and ``serve``: the terminal side of :mod:`medassist.serving`.

Defaults and help come from :class:`~medassist.config.ServeConfig` and
:class:`~medassist.config.GenerationSettings`, where each setting is defined once; the
sampling knobs are OpenAI's (temperature 0 = greedy), mapped by
:func:`~medassist.serving.sampling` for all three commands.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Callable, TextIO

from pydantic import BaseModel

from medassist.cli.common import say
from medassist.config import GenerationSettings, ServeConfig, check_settings, field_help
from medassist.errors import MedassistError

DEFAULT_MODEL = "smollm2-135m"
MODEL_HELP = "run directory, preset (medassist models) or model folder / hub id (default: %(default)s)"


def _option(p: argparse.ArgumentParser, model: type[BaseModel], name: str, *flags: str, help: str | None = None,
            **kwargs) -> None:
    """An option whose default and help are those of ``model``'s field ``name`` (its dest).
    Its first flag is the field's name (what a validation error names), then any others."""
    field = model.model_fields[name]
    default = field.default if field.default_factory is None else field.default_factory()
    text = help or (field.description if default is None else field_help(model, name))
    p.add_argument("--" + name.replace("_", "-"), *flags, dest=name, default=kwargs.pop("default", default),
                   help=text.replace("%", "%%"), **kwargs)


def _generation_options(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="RUN|PRESET|PATH", help=MODEL_HELP)
    _option(p, ServeConfig, "system_prompt", metavar="TEXT")
    if server:
        _option(p, ServeConfig, "default_max_tokens", "--max-new-tokens", type=int, metavar="N")
    else:  # the server's default answer length, so `generate` answers as `serve` does
        default = ServeConfig.model_fields["default_max_tokens"].default
        _option(p, GenerationSettings, "max_new_tokens", type=int, metavar="N", default=default,
                help=f"{GenerationSettings.model_fields['max_new_tokens'].description} (default: {default})")
    _option(p, ServeConfig, "temperature", type=float, metavar="T")
    _option(p, ServeConfig, "top_p", type=float, metavar="P")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for generation (default: torch's choice, one per core); on a busy "
                        "machine 1 is often much faster")
    p.add_argument("--index", metavar="INDEX_DIR",
                   help="answer from this retrieval index (medassist index build) and list the sources used "
                        "(default: the index a model trained with retrieval was trained with)")
    p.add_argument("--no-index", action="store_true", help="answer without retrieval, even for a model trained "
                   "with it")


def _hosts(text: str) -> list[str]:
    return [h.strip() for h in text.split(",") if h.strip()]


def add_serving_commands(subparsers) -> None:
    """Register ``generate``, ``chat`` and ``serve`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "generate", help="answer one question and print the answer",
        description="Answer one question with a model and print the answer.",
    )
    p.add_argument("question", help="the question (quote it)")
    _generation_options(p)
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help=GenerationSettings.model_fields["stop"].description + " Repeatable.")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "chat", help="interactive chat in the terminal (streams the answer)",
        description="Chat with a model in the terminal. Answers stream as they are generated; decoder-only "
                    "chat models remember the conversation (oldest turns are dropped when it gets too "
                    "long). Type /reset to start over; Ctrl-D or Ctrl-C quits.",
    )
    _generation_options(p)
    _option(p, ServeConfig, "max_prompt_tokens", type=int, metavar="N")
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP API and a chat web page",
        description="Serve a model over HTTP: POST /v1/chat/completions (OpenAI-compatible, streaming "
                    "with stream: true), GET /v1/models, GET /health, and a chat page at /. "
                    "Concurrent generations share forward passes (continuous batching: --max-concurrency "
                    "rows; --no-batching runs one thread per generation); requests beyond "
                    "--max-concurrency + --max-queue get 429 at once.",
    )
    _generation_options(p, server=True)
    _option(p, ServeConfig, "host")
    _option(p, ServeConfig, "port", type=int)
    _option(p, ServeConfig, "api_key", metavar="KEY")
    _option(p, ServeConfig, "allowed_hosts", type=_hosts, metavar="HOST,HOST",
            help=ServeConfig.model_fields["allowed_hosts"].description + " (comma-separated; '*' = any)")
    _option(p, ServeConfig, "model_name", metavar="ID")
    for name in ("max_prompt_tokens", "max_tokens_limit", "max_concurrency", "max_queue", "max_body_bytes"):
        _option(p, ServeConfig, name, type=int, metavar="N")
    _option(p, ServeConfig, "queue_timeout_s", "--queue-timeout", type=float, metavar="SECONDS")
    _option(p, ServeConfig, "batching", action=argparse.BooleanOptionalAction)
    _option(p, ServeConfig, "max_batch_size", type=int, metavar="N")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: %(default)s)")
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------------------
def load_model(ref: str):
    """Load a model for inference (a seam for tests)."""
    from medassist.models import load_for_inference

    return load_for_inference(ref)


def _params(args: argparse.Namespace):
    from medassist.serving import RequestError, sampling

    try:
        return sampling(args.max_new_tokens, args.temperature, args.top_p, tuple(getattr(args, "stop", None) or ()))
    except RequestError as exc:
        raise MedassistError(f"{args.command}: {exc}") from None


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise MedassistError(f"--threads must be at least 1, not {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _sources(args: argparse.Namespace, loaded):
    """The index to answer from (``--index``, or the one the model was trained with), or None."""
    from medassist.serving.sources import sources_for

    if args.index and args.no_index:
        raise MedassistError(f"{args.command}: --index and --no-index exclude each other")
    finder = sources_for(loaded, args.index, enabled=not args.no_index)
    if finder is not None:
        say(f"answering from the index {finder.index_dir} (at most {finder.k} sources, threshold {finder.min_score:g})")
    return finder


def _assistant(args: argparse.Namespace, max_prompt_tokens: int = ServeConfig.model_fields["max_prompt_tokens"].default):
    from medassist.serving import Assistant

    params = _params(args)  # bad options fail before a model is loaded
    _set_threads(args)
    loaded = load_model(args.model)
    assistant = Assistant(loaded, args.system_prompt, max_prompt_tokens, sources=_sources(args, loaded))
    _warn_on_mismatch(loaded, assistant.fmt)
    return assistant, params


def _warn_on_mismatch(loaded, serve_fmt) -> None:
    """The doctor's checks at start-up: a prompt or stop token that differs from training is
    one loud line each (``medassist doctor`` turns them into a failing exit status)."""
    from medassist.export.doctor import check_run

    for problem in check_run(loaded, serve_fmt=serve_fmt):
        say(f"warning: {problem.check}: {problem.message}")


def cmd_generate(args: argparse.Namespace) -> int:
    assistant, params = _assistant(args)
    passages = assistant.find_sources(args.question, (), params.max_new_tokens)
    answer = assistant.generate(args.question, settings=params, passages=passages or ())
    print(answer.text.strip())
    grounding = assistant.cite(answer.text, args.question, passages)
    if grounding is not None:
        print("\n" + "\n".join(grounding.lines()))
    return 0


def cmd_chat(args: argparse.Namespace, input_fn: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    from medassist.serving import DISCLAIMER, RequestError

    out = out or sys.stdout
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    say(f"loading {args.model} ...")
    assistant, params = _assistant(args, args.max_prompt_tokens)
    write = lambda text: (out.write(text), out.flush())  # noqa: E731
    write(f"medassist chat: {args.model} ({assistant.family.name}). {DISCLAIMER}\n"
          "Type a question; /reset starts over; Ctrl-D or Ctrl-C quits.\n")
    if not assistant.keeps_history:
        write("(this encoder-decoder model answers each question on its own; earlier turns are not sent)\n")
    history: list[tuple[str, str]] = []
    generation = None
    try:
        while True:
            try:
                question = input_fn("\nyou> ").strip()
            except EOFError:
                write("\n")
                return 0
            if not question:
                continue
            if question in ("/reset", "/new"):
                history = []
                write("(conversation cleared)\n")
                continue
            if question in ("/exit", "/quit"):
                return 0
            try:
                kept = assistant.fit_history(question, history, params.max_new_tokens)
            except RequestError as exc:
                write(f"error: {exc}\n")
                continue
            if len(kept) < len(history):
                write(f"(dropped the {len(history) - len(kept)} oldest turn(s) to fit the context)\n")
            history = kept
            passages = assistant.find_sources(question, history, params.max_new_tokens)
            write("assistant> ")
            generation = assistant.stream(question, history, params, passages or ())
            started = False
            for piece in generation:
                if not started:  # answers often begin with a newline; start the line with text
                    piece = piece.lstrip()
                    started = bool(piece)
                write(piece)
            answer = generation.result()
            generation = None
            if answer.finish_reason == "length":
                write(" [cut at --max-new-tokens]")
            write("\n")
            grounding = assistant.cite(answer.text, question, passages)
            if grounding is not None:
                write("\n".join(grounding.lines()) + "\n")
            if assistant.keeps_history:  # earlier turns keep their answers, not their sources
                history.append((question, answer.text.strip()))
    except KeyboardInterrupt:
        if generation is not None:
            generation.cancel()
        write("\n")
        return 0


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise MedassistError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from medassist.serving import create_app
    from medassist.serving.limits import LingeringClose, is_loopback

    values = {name: getattr(args, name) for name in ServeConfig.model_fields if hasattr(args, name)}
    values["api_key"] = args.api_key if args.api_key is not None else os.environ.get("MEDASSIST_API_KEY") or None
    values["model_name"] = args.model_name or args.model
    settings = check_settings(ServeConfig, "serve", **values)
    _check_port(settings.host, settings.port)
    _set_threads(args)
    say(f"loading {args.model} ...")
    loaded = load_model(args.model)
    app = create_app(loaded, settings, sources=_sources(args, loaded))
    _warn_on_mismatch(loaded, app.state.server.backend.fmt)
    base = f"http://{'[' + settings.host + ']' if ':' in settings.host else settings.host}:{settings.port}"
    say(f"serving {settings.model_name}: chat page {base}/ , OpenAI API {base}/v1 "
        f"({'API key required' if settings.api_key else 'no API key'}); Ctrl-C stops")
    if not settings.api_key and not is_loopback(settings.host):
        say(f"warning: listening on {settings.host} without --api-key: anyone who can reach this port can use it")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=3,
                http=LingeringClose)
    return 0
