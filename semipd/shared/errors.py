"""Errors caused by what a user asked for: reported as one clear line, never a traceback."""


class UserError(ValueError):
    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line, whatever a library said


def first_line(e: BaseException) -> str:
    """The gist of a library's exception, for wrapping in a UserError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
