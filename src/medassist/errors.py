"""Errors that the CLI turns into one clear line and a non-zero exit."""


class MedassistError(Exception):
    """Base class: a user error. The CLI prints `error: <message>` and exits 2."""


class ConfigError(MedassistError):
    """A config file or --set override is invalid; the message names the key."""


class DataError(MedassistError):
    """A data file cannot be used; the message names the file (and row/column)."""


class ModelError(MedassistError):
    """A model cannot be found or loaded; the message says what to install or download."""


class TrainingInterrupted(MedassistError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; the message says how to resume."""
