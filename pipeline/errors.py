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


class StorageError(HSpaceError, OSError):
    """A file that cannot be written (full disk, permissions); the message names the path."""


class RunLockedError(HSpaceError, RuntimeError):
    """Another process is writing the same stage of the same run directory."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM: the command stops, leaving only whole files; re-running it resumes.

    Not a KeyboardInterrupt: Lightning turns those into ``sys.exit(1)``."""



class ConvergenceError(HSpaceError, ArithmeticError):
    """An iterative method stopped short of its tolerance; the message says what it reached and
    which setting to change."""
