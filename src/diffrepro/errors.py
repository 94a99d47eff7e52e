"""One exception type for every user-facing failure: the CLI prints its message as one line."""


class UserError(Exception):
    """A problem the user can fix (bad param, missing file, corrupt data); the message says how."""
