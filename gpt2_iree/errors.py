"""The one base class of every error a user can cause and fix."""


class Gpt2IreeError(RuntimeError):
    """Bad input, a missing build, a failed download or compile: the message
    says what went wrong and what to do, so no traceback is shown for it."""
