"""Errors the launcher reports to the user as one line (exit 2), never as a traceback."""
from __future__ import annotations


class LaunchError(ValueError):
    """A bad launch request (hosts, -np, options). The message is one line naming the bad input and the fix.

    A ValueError subclass so pure helpers can be used (and tested) like any validating function.
    """
