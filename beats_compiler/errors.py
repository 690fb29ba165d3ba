"""Error classes; each carries the CLI exit code it maps to."""


class BeatsError(Exception):
    """Base of every error the tool reports as a one-line message."""

    exit_code = 3


class InputError(BeatsError):
    """Bad input or usage: unreadable model, bad flag value, unsafe path."""

    exit_code = 2


class VerificationError(BeatsError):
    """The compiled model does not compute the same function as the input."""

    exit_code = 1


class TargetError(BeatsError):
    """A valid model that the target's own toolchain (fp16 converter, quantizer,
    QNN HTP backend) fails on: not bad input, not a bug of beats-compile."""

    exit_code = 4
