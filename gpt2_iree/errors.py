"""The one base class of every error a user can cause and fix."""


class Gpt2IreeError(RuntimeError):
    """Bad input, a missing build, a failed download or compile: the message
    says what went wrong and what to do, so no traceback is shown for it."""


def first_line(err: Exception) -> str:
    """The first line of an error's message (IREE's run on with a stack of
    contexts), or its type's name where it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
