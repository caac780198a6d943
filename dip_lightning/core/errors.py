"""The kit's own failures: errors whose message names the problem and the fix.

Every command prints a :class:`KitError` as one ``error: <message>`` line and exits with code 2; anything else is a
bug and keeps its traceback. Subclasses also derive from the built-in exception that describes them (a bad
checkpoint is a ``ValueError``), so callers that catch those keep working.
"""

from __future__ import annotations

__all__ = ["KitError"]


class KitError(Exception):
    """A failure the kit understands and explains in its message (what is wrong, what to do)."""
