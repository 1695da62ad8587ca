"""User-facing errors. Each is shown as ONE line (no traceback) and exits with code 2."""
from launch.contract import USAGE_EXIT_CODE


class UserError(Exception):
    """Bad input from the user: a config, a command line or a data file. Message says what and how to fix."""

    exit_code = USAGE_EXIT_CODE


class ConfigError(UserError):
    """The experiment config (YAML or --set override) is invalid."""


class DataError(UserError):
    """A data file is missing, empty or malformed."""


class StorageError(UserError):
    """The run directory cannot take the files: disk full, read-only, not a directory."""
