"""Errors the CLI reports as one clear line (the user's input is at fault), not a traceback."""


class UserError(Exception):
    """Bad input: a missing or corrupt file, a wrong version, an unknown option value."""


class CompatibilityError(UserError):
    """An artifact (engine, cache, model) does not match this machine or these inputs."""
