"""User-facing errors. Anything derived from `UserError` is printed as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """config.json is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """Weights are missing, corrupt, or do not match the config."""


class UnsupportedError(UserError):
    """A valid request this tool or backend cannot do (unsupported option, exceeded context)."""


class ContextLimitError(UnsupportedError):
    """The prompt plus requested tokens exceed the model's or artifact's maximum sequence length."""
