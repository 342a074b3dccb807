"""Errors caused by the user's input (config, paths, layout). Commands print them as one line and exit 2;
anything else is a bug and keeps its traceback."""


class UserError(Exception):
    pass
