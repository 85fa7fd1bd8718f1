"""``medassist export`` and ``medassist doctor``: share a run, and check that training, serving
and exports prompt and stop the same way (:mod:`medassist.export`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medassist.cli.common import say


def cmd_export(args: argparse.Namespace) -> int:
    from medassist.export import export_run, push_to_hub, require_hub_token

    token = require_hub_token() if args.push_to_hub else None  # fail before the work, not after
    gguf_type = args.gguf_type or ("f16" if args.gguf else None)
    result = export_run(args.run, args.out, merge=args.merge, overwrite=args.overwrite, gguf_type=gguf_type, log=say)
    for problem in result.warnings:
        say(f"warning: {problem}")
    if result.warnings:
        say(f"the run has {len(result.warnings)} problem(s) above; `medassist doctor {args.run}` checks it again")
    print(f"exported {result.kind} model to {result.out} (model card: {result.out / 'README.md'})")
    if result.gguf:
        print(f"GGUF ({gguf_type}): {result.gguf}\nOllama: cd {result.out} && ollama create {result.out.name} "
              f"-f Modelfile && ollama run {result.out.name}")
    if args.push_to_hub:
        url = push_to_hub(result.out, args.push_to_hub, token, private=args.private)
        print(f"uploaded to {url}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from medassist.export import check_export, check_run
    from medassist.rundir import RunDir

    path = Path(args.path)
    if RunDir.find(path) is not None:
        say(f"loading {path} and checking training against serving")
        problems = check_run(path)
        checked = ["EOS kept in the loss", "mask ends on the end-of-turn token", "serve prompt = training prompt"]
    else:
        say(f"checking the export {path} against its tokenizer")
        problems = check_export(path, serve=True)
        checked = ["stop tokens", "chat template", "system prompt", "GGUF tokenizer", "serve prompt = training prompt"]
    if args.export:
        problems += check_export(args.export)
        checked.append(f"the export {args.export}")
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"ok: {path}: {', '.join(checked)}")
    return 0


def add_commands(subparsers) -> None:
    from medassist.export.gguf import GGUF_TYPES

    p = subparsers.add_parser(
        "export", help="package a run to share: merged model or adapter, model card, GGUF + Ollama Modelfile",
        description="Write a run's final model to a folder with a model card (README.md); optionally merge a LoRA "
                    "adapter into its base, write model.gguf and an Ollama Modelfile, and upload to the Hugging "
                    "Face Hub. The export is checked against the tokenizer before it is moved into place.")
    p.add_argument("run", help="run directory (holds config.yaml and final/)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--merge", action="store_true",
                   help="merge a LoRA adapter into the base model (loads with plain transformers)")
    p.add_argument("--gguf", action="store_true",
                   help="also write model.gguf and an Ollama Modelfile (decoder-only models; implies --merge)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                   help="GGUF weight type (implies --gguf; default f16): f16 and bf16 keep the merged weights at that "
                        "precision, q8_0 is about half the size")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload to this Hub repo (needs HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=cmd_export)

    d = subparsers.add_parser(
        "doctor", help="check that training, serving and exports use one prompt and one set of stop tokens",
        description="Check a run (EOS kept in the loss, the answer mask ends on the end-of-turn token, serve builds "
                    "the prompt training used) or an export folder (generation_config.json, model.gguf and "
                    "Modelfile agree with the tokenizer). Each failure is one line; exit status 1 on any.")
    d.add_argument("path", help="run directory, or a folder written by `medassist export`")
    d.add_argument("--export", metavar="DIR", help="also check this export folder")
    d.set_defaults(func=cmd_doctor)
