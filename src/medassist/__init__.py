"""medassist: turn small language models into medical question-answering assistants.

The path through the package follows the folder listing:
``data`` (load, clean) and ``splits`` (group split) -> ``formatting`` (examples -> tokens and
loss masks) and ``families`` (everything decoder-only and encoder-decoder models do their own
way) -> ``presets`` and ``models`` (loading) -> ``training`` (Trainer, run directory) ->
``engine`` (one generation engine, with ``streaming`` and ``batching``) -> ``evaluation``
(metrics, baselines, report) -> ``serving`` (assistant, OpenAI-compatible API, web page) ->
``export`` (Hugging Face, GGUF, Ollama); ``config`` holds every setting; ``cli`` is a thin
layer over all of them.
"""

__version__ = "0.2.0"

# one wording everywhere a user reads it (CLI chat, web page, API description, model cards)
DISCLAIMER = (
    "medassist gives general medical information, not medical advice. It can state wrong or outdated "
    "things fluently. For decisions about your health, see a clinician."
)
