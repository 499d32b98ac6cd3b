"""Errors that reach users: each says what was wrong, where, and what to do."""


class UserFacingError(Exception):
    """An error the CLI prints as one clear line instead of a traceback."""


class ConfigError(UserFacingError, ValueError):
    """A configuration value is unknown or inconsistent."""


class ImageError(UserFacingError, ValueError):
    """An image could not be read or converted."""


class ImageTokenMismatchError(UserFacingError, ValueError):
    """The number of `<image>` placeholders does not match the images given."""


class ContextOverflowError(UserFacingError, ValueError):
    """A conversation does not fit in the model's context window."""
