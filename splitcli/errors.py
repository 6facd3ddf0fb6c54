"""The one error type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations


class SplitLLMError(Exception):
    """A user-facing failure: bad input, missing file, unsupported model.

    `exit_code` follows the CLI convention: 2 for bad input / missing things, 3 for an
    infeasible request (e.g. a plan that fits no configuration).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
