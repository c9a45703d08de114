"""The one exception type for user mistakes, printed by the CLI as a single line."""


class MoelabError(Exception):
    """A problem with the user's input (recipe, model, flags, paths), with the fix in its message."""
