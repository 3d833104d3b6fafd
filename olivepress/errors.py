class UserError(Exception):
    """A problem with the user's input or config: reported plainly, never retried."""
