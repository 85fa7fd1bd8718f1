"""Serving: the assistant (prompts, history, lengths, generation through the engine) and the
HTTP server in front of it (OpenAI-compatible API, chat page)."""

from medassist.serving.assistant import DEFAULT_SYSTEM_PROMPT, DISCLAIMER, Assistant, RequestError, sampling

__all__ = ["DEFAULT_SYSTEM_PROMPT", "DISCLAIMER", "Assistant", "RequestError", "sampling", "create_app"]


def create_app(*args, **kwargs):
    """The FastAPI app (imported on first use: fastapi is not needed to chat in a terminal)."""
    from medassist.serving.app import create_app as build

    return build(*args, **kwargs)
