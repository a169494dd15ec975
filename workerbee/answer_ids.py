"""The token ids behind a whole answer's choices, carried from the engine to the connection's `Result`.

A streamed answer names its ids chunk by chunk (`decoding.TokenIds`); a whole one names them at the end,
one list per choice: what the queen counts the completion by and what its audits score.
"""

from __future__ import annotations

from typing import Any


class WithTokenIds(dict[str, Any]):
    """A whole response (a dict, as before) that also names the ids of each choice's generated tokens.

    A dict, so that whoever only reads the response reads it as before; `token_ids` is in the order of
    the response's choices.
    """

    token_ids: list[list[int]]

    def __init__(self, response: dict[str, Any], token_ids: list[list[int]]) -> None:
        """The response, naming `token_ids`."""
        super().__init__(response)
        self.token_ids = token_ids


MAX_CHOICES = 128
MAX_IDS = 2**16
"""What one Result may name (protocol.Result.token_ids): more choices or longer ones name none."""


def token_ids_of(response: dict[str, Any] | None) -> list[list[int]] | None:
    """The ids a whole response names, if it names them within the frame's limits."""
    if not isinstance(response, WithTokenIds):
        return None
    ids = response.token_ids
    if len(ids) > MAX_CHOICES or any(len(choice) > MAX_IDS for choice in ids):
        return None
    return ids
