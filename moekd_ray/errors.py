"""The errors a user can fix. The CLI prints each as one `moekd: error: ...` line (no traceback unless --debug);
kept free of heavy imports so that reporting a typo does not wait for torch, Ray or MLflow to load."""


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem with its fix."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the line and the fix."""


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message says which and how to fix it."""


USER_ERRORS = (ConfigError, DataError, TrackingError, ValueError, FileNotFoundError)
