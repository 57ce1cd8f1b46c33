"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: an unknown name, a malformed file, a wrong value.

    The message is one sentence naming the file/field and what was expected. The CLI prints it
    without a traceback and exits with code 2.
    """


class RunFailed(Exception):
    """A run that started but could not finish (diverged training, a method returning bad samples): the
    command reports it and exits 1."""


class SampleError(RunFailed):
    """A method's ``sample`` returned something other than the (B, n, H, W) bool masks the contract asks."""
