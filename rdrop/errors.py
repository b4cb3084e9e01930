"""User-fixable failures: one clear paragraph and exit code 2, never a traceback.

Anything a user can get wrong (a config value, a data file, a checkpoint) raises `UserError` with a
message that names the thing and says how to fix it. Entry points wrap `main` in `exit_on_user_error`.
Everything else is a programming error and keeps its traceback.
"""

import functools
import sys

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem in the user's input, with a message that names it and the fix."""


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            paragraph = " ".join(str(error).split())  # embedded messages (YAML, Paddle) bring line breaks
            print(f"error: {paragraph}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper
