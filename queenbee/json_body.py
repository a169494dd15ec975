"""Client request bodies as JSON objects, parsed defensively: bounded nesting and numbers no client needs.

A public edge sees bodies built to hurt: nesting thousands deep (recursion in every later consumer),
5,000-digit integers (quadratic to convert), `NaN` and `Infinity` (not JSON, yet Python's parser takes
them), floats that overflow to infinity. Each is refused here with a 400 naming what is wrong, before
any model validation runs. Big bodies are parsed in a worker thread so the event loop keeps serving
other clients while a multi-MiB body is read.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Final

from queenbee.errors import InvalidRequest

MAX_NESTING: Final = 64
"""Deepest nesting of arrays and objects accepted anywhere in a body (tool schemas included)."""

MAX_NUMBER_DIGITS: Final = 40
"""Longest number literal accepted, characters: room for any 64-bit integer or double, and no more."""

THREAD_PARSE_BYTES: Final = 256 * 2**10
"""Bodies at least this big are parsed off the event loop."""


class _PoisonNumber(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_DIGITS:
        raise _PoisonNumber(f"a number with {len(text)} digits is too long (at most {MAX_NUMBER_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_DIGITS:
        raise _PoisonNumber(f"a number of {len(text)} characters is too long (at most {MAX_NUMBER_DIGITS})")
    value = float(text)
    if not math.isfinite(value):
        raise _PoisonNumber(f"the number {text} is out of range")
    return value


def _parse_constant(text: str) -> Any:
    raise _PoisonNumber(f"{text} is not a JSON value")


_DECODER: Final = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


def nesting_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep in `value` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _bracket_depth(body: bytes) -> int:
    # Brackets inside strings only over-count: the true nesting is at most this.
    depth = 0
    deepest = 0
    for char in body.translate(None, _NOT_BRACKETS):
        if char in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


_NOT_BRACKETS: Final = bytes(byte for byte in range(256) if byte not in b"[]{}")


def parse_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequest saying what is wrong with it."""
    brackets = _bracket_depth(body)
    if brackets > MAX_NESTING * 16:
        # Deep enough to strain the parser's own recursion: refused before parsing.
        raise InvalidRequest(f"The request body nests arrays and objects deeper than {MAX_NESTING} levels.")
    try:
        data = _DECODER.decode(body.decode())
    except _PoisonNumber as exc:
        raise InvalidRequest(f"The request body is not acceptable JSON: {exc}.") from None
    except RecursionError:
        raise InvalidRequest(
            f"The request body nests arrays and objects deeper than {MAX_NESTING} levels."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if brackets > MAX_NESTING and nesting_depth_exceeds(data, MAX_NESTING):
        raise InvalidRequest(f"The request body nests arrays and objects deeper than {MAX_NESTING} levels.")
    return data


async def parse_body_async(body: bytes) -> dict[str, Any]:
    """`parse_body`, in a worker thread for big bodies so other requests are served meanwhile."""
    if len(body) < THREAD_PARSE_BYTES:
        return parse_body(body)
    return await asyncio.to_thread(parse_body, body)
