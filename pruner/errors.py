"""User-facing errors: anything the user can fix by changing their input."""


class PrunerError(Exception):
    """A clear, actionable error. The CLI prints it and exits with status 2."""
