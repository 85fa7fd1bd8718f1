"""Export: a run as a folder to share, for transformers, the Hub, llama.cpp and Ollama.

- :mod:`~medassist.export.hf`: :func:`export_run` (merge, copy, write, check, move into place)
  and the Hub upload;
- :mod:`~medassist.export.card`: the model card (``huggingface_hub.ModelCard``);
- :mod:`~medassist.export.gguf`: ``model.gguf`` with the ``gguf`` package (llama.cpp's gguf-py);
- :mod:`~medassist.export.chat`: the chat template training used, and its shape;
- :mod:`~medassist.export.ollama`: the ``Modelfile`` (the template in Go syntax, stops, system);
- :mod:`~medassist.export.doctor`: the checks that training, serving and every export prompt
  and stop the same way (``medassist doctor``).

The CLI (``medassist export``, ``medassist doctor``) is :mod:`medassist.cli.export`.
"""

from medassist.export.doctor import Problem, check_export, check_run
from medassist.export.hf import ExportError, ExportResult, export_run, hub_token, push_to_hub, require_hub_token

__all__ = ["ExportError", "ExportResult", "Problem", "check_export", "check_run", "export_run", "hub_token",
           "push_to_hub", "require_hub_token"]
