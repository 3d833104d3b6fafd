class UserError(Exception):
    """A problem with the user's input or config: reported plainly, never retried."""


class InvalidArgument(UserError, ValueError):
    """A bad argument value that the user chose (a deploy option, the model's chat template, data that
    leaves nothing to score): a UserError (exit 1, one paragraph, never retried) that callers catching
    ValueError still catch."""
