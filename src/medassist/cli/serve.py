"""``medassist generate``, ``chat`` and ``serve``: the terminal side of :mod:`medassist.serving`.

``cli.py`` registers these with :func:`add_serving_commands`; each handler takes the parsed
``args`` and returns an exit code. ``python -m medassist.serving_cli`` runs them on their own.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import Callable, TextIO

from medassist.errors import MedassistError

DEFAULT_MODEL = "smollm2-135m"
MODEL_HELP = "run directory, preset (medassist models) or model folder / hub id (default: %(default)s)"


def _say(message: str) -> None:
    print(f"medassist: {message}", file=sys.stderr, flush=True)


def _generation_options(p: argparse.ArgumentParser, *, server: bool = False) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="RUN|PRESET|PATH", help=MODEL_HELP)
    p.add_argument("--system-prompt", metavar="TEXT",
                   help="system prompt for chat-template models; default: the run's own, else a careful "
                        "medical-information prompt; '' for none (ignored by encoder-decoder models)")
    when = " when a request does not say (max_tokens)" if server else ""
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help=f"most tokens in an answer{when} (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy, deterministic (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens with this much probability "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for generation (default: torch's choice, one per core); on a busy "
                        "machine 1 is often much faster")


def add_serving_commands(subparsers) -> None:
    """Register ``generate``, ``chat`` and ``serve`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "generate", help="answer one question and print the answer",
        description="Answer one question with a model and print the answer.",
    )
    p.add_argument("question", help="the question (quote it)")
    _generation_options(p)
    p.add_argument("--stop", action="append", metavar="TEXT", help="end the answer before this text; repeatable")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "chat", help="interactive chat in the terminal (streams the answer)",
        description="Chat with a model in the terminal. Answers stream as they are generated; decoder-only "
                    "chat models remember the conversation (oldest turns are dropped when it gets too "
                    "long). Type /reset to start over; Ctrl-D or Ctrl-C quits.",
    )
    _generation_options(p)
    p.add_argument("--max-prompt-tokens", type=int, default=1024, metavar="N",
                   help="most prompt tokens (system + history + question) (default: %(default)s)")
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP API and a chat web page",
        description="Serve a model over HTTP: POST /v1/chat/completions (OpenAI-compatible, streaming "
                    "with stream: true), GET /v1/models, GET /health, and a chat page at /. "
                    "Generation runs in worker threads; requests beyond --max-concurrency + --max-queue "
                    "get 429 at once.",
    )
    _generation_options(p, server=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 route "
                        "(default: $MEDASSIST_API_KEY; unset = open)")
    p.add_argument("--model-name", metavar="ID", help="model id reported by /v1/models (default: the --model value)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, metavar="N",
                   help="longer prompts (system + history + question) get 400 (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=512, metavar="N",
                   help="largest max_tokens a request may ask for; more gets 400 (default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                   help="generations running at once (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=4, metavar="N",
                   help="requests waiting for a generation slot; beyond this, 429 (default: %(default)s)")
    p.add_argument("--queue-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a request waiting longer than this gets 503 (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: %(default)s)")
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------------------
def load_model(ref: str):
    """Load a model for inference (a seam for tests)."""
    from medassist.models import load_for_inference

    return load_for_inference(ref)


def _params(args: argparse.Namespace):
    from medassist.serving import sampling

    return sampling(args.max_new_tokens, args.temperature, args.top_p, tuple(getattr(args, "stop", None) or ()))


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise MedassistError(f"--threads must be at least 1, not {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _assistant(args: argparse.Namespace, max_prompt_tokens: int = 1024):
    from medassist.serving import Assistant

    params = _params(args)  # bad options fail before a model is loaded
    _set_threads(args)
    return Assistant(load_model(args.model), args.system_prompt, max_prompt_tokens), params


def cmd_generate(args: argparse.Namespace) -> int:
    assistant, params = _assistant(args)
    completion = assistant.generate(args.question, settings=params)
    print(completion.text.strip())
    return 0


def cmd_chat(args: argparse.Namespace, input_fn: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    from medassist.serving import DISCLAIMER, RequestError

    out = out or sys.stdout
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    _say(f"loading {args.model} ...")
    assistant, params = _assistant(args, args.max_prompt_tokens)
    write = lambda text: (out.write(text), out.flush())  # noqa: E731
    write(f"medassist chat: {args.model} ({assistant.family}). {DISCLAIMER}\n"
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
            write("assistant> ")
            generation = assistant.stream(question, history, params)
            started = False
            for piece in generation:
                if not started:  # answers often begin with a newline; start the line with text
                    piece = piece.lstrip()
                    started = bool(piece)
                write(piece)
            completion = generation.result()
            generation = None
            if completion.finish_reason == "length":
                write(" [cut at --max-new-tokens]")
            write("\n")
            if assistant.keeps_history:
                history.append((question, completion.text.strip()))
    except KeyboardInterrupt:
        if generation is not None:
            generation.cancel()
        write("\n")
        return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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

    from medassist.config import ServeConfig, check_settings
    from medassist.serving import create_app

    api_key = args.api_key if args.api_key is not None else os.environ.get("MEDASSIST_API_KEY") or None
    settings = check_settings(
        ServeConfig, "serve",
        host=args.host, port=args.port, api_key=api_key, model_name=args.model_name or args.model,
        system_prompt=args.system_prompt, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, max_concurrency=args.max_concurrency,
        max_queue=args.max_queue, queue_timeout_s=args.queue_timeout,
    )
    _check_port(args.host, args.port)
    _set_threads(args)
    _say(f"loading {args.model} ...")
    app = create_app(load_model(args.model), settings)
    base = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    _say(f"serving {settings.model_name}: chat page {base}/ , OpenAI API {base}/v1 "
         f"({'API key required' if api_key else 'no API key'}); Ctrl-C stops")
    if not api_key and not _loopback(args.host):
        _say(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use it")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=3)
    return 0


def main(argv: list[str] | None = None) -> int:
    """These three commands alone (``python -m medassist.serving_cli``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="medassist", description="Use a medassist model.")
    add_serving_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedassistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
