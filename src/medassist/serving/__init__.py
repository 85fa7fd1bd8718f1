"""Serving, in three layers on the one engine:

- :mod:`~medassist.serving.assistant`: prompts, history, lengths, generation (no I/O);
- :mod:`~medassist.serving.openai`: the OpenAI wire format (requests, responses, errors);
- :mod:`~medassist.serving.app`: the HTTP server (routes, SSE, the chat page), with
  :mod:`~medassist.serving.limits` (admission, disconnects, allowed Host names).
"""

from medassist import DISCLAIMER
from medassist.serving.assistant import DEFAULT_SYSTEM_PROMPT, Assistant, RequestError, sampling

__all__ = ["DEFAULT_SYSTEM_PROMPT", "DISCLAIMER", "Assistant", "RequestError", "sampling", "create_app"]


def create_app(*args, **kwargs):
    """The FastAPI app (imported on first use: fastapi is not needed to chat in a terminal)."""
    from medassist.serving.app import create_app as build

    return build(*args, **kwargs)
