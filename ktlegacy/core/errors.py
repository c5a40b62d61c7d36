"""The one error type users see.

Every failure a user can cause or meet (bad arch, drifted upstream tree, no Docker
daemon...) is raised as :class:`KtlegacyError` with a single line that names what was
wrong and how to fix it. The CLI and the Invoke tasks print that line and exit non-zero;
nothing else is printed, so scripts and CI logs stay readable.
"""


class KtlegacyError(Exception):
    """A failure explained in one line; ``exit_code`` is what the process returns."""

    def __init__(self, message: str, exit_code: int = 2):
        if "\n" in message:
            raise ValueError("KtlegacyError messages are one line: " + repr(message))
        super().__init__(message)
        self.exit_code = exit_code
