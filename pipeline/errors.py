"""Errors the CLI reports as one clear line (and a non-zero exit) instead of a traceback."""


class HSpaceError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class InputError(HSpaceError, ValueError):
    """Bad arguments: wrong shapes, lengths or names."""


class ConfigError(HSpaceError, ValueError):
    """An invalid configuration key or value."""


class ModelLoadError(HSpaceError, OSError):
    """A model or weight file that cannot be found or read."""


class DatasetError(HSpaceError, OSError):
    """A run directory or dataset that is missing, corrupt or from a different configuration."""


class ConvergenceError(HSpaceError, ArithmeticError):
    """An iterative method stopped short of its tolerance; the message says what it reached and
    which setting to change."""
