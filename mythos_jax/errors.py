"""``CommandError``: an expected, user-facing failure of a command (imports nothing)."""


class CommandError(Exception):
    """Printed by the CLI as one ``error: <message>`` line, exit code 2."""
