"""medassist: turn small language models into medical question-answering assistants.

The path through the package follows the folder listing:
``data`` (load, clean, group split) -> ``formatting`` (examples -> tensors and loss masks,
one class per model family) -> ``models`` (presets, loading) -> ``training`` (Trainer,
run directory) -> ``evaluation`` (generation + metrics) -> ``reporting`` (plots, HTML)
-> ``serving`` (OpenAI-compatible API, web page); ``cli`` is a thin layer over all of them.
"""

__version__ = "0.1.0"
