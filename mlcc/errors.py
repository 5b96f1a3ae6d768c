"""Errors that mlcc reports to users as one line, prefixed with the stage that failed."""


class MlccError(Exception):
    """A user-facing failure: `[stage] what is wrong, the values, and the fix`."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"[{stage}] {message}")
        self.stage = stage
        self.message = message
