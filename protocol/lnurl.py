"""Validation of payout addresses: a Lightning address (LUD-16) or a bech32-encoded LNURL (LUD-01).

Only the form is checked: whether the address can be paid is the payout tool's business. What is
refused cannot reach the usage ledger, so a worker cannot smuggle another row or a log line into it.
"""

from __future__ import annotations

import re
from typing import Final

MAX_LN_URL_LENGTH: Final = 2048

_BECH32_CHARSET: Final = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GENERATORS: Final = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)

# LUD-16: the user part is lower-case letters, digits and -_.+; the domain an ordinary host name.
_ADDRESS: Final = re.compile(
    r"[a-z0-9_.+-]{1,64}@(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}"
)


def _polymod(values: list[int]) -> int:
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for bit, generator in enumerate(_BECH32_GENERATORS):
            if (top >> bit) & 1:
                checksum ^= generator
    return checksum


def is_bech32_lnurl(text: str) -> bool:
    """Whether `text` is a bech32 string with the human-readable part `lnurl` and a valid checksum."""
    if text != text.lower() and text != text.upper():
        return False  # bech32 forbids mixed case
    text = text.lower()
    hrp, separator, data = text.rpartition("1")
    if hrp != "lnurl" or not separator or len(data) < 7:
        return False
    if any(char not in _BECH32_CHARSET for char in data):
        return False
    expanded = [ord(char) >> 5 for char in hrp] + [0] + [ord(char) & 31 for char in hrp]
    return _polymod(expanded + [_BECH32_CHARSET.index(char) for char in data]) == 1


def is_lightning_address(text: str) -> bool:
    """Whether `text` has the form of a Lightning address, user@domain (lower case, as LUD-16 says)."""
    return _ADDRESS.fullmatch(text) is not None


def check_ln_url(value: str) -> str:
    """`value` if it is empty, a Lightning address or a bech32 LNURL; ValueError saying why not otherwise."""
    if not value:
        return value
    if len(value) > MAX_LN_URL_LENGTH:
        raise ValueError(f"a payout address is at most {MAX_LN_URL_LENGTH} characters")
    if is_lightning_address(value) or is_bech32_lnurl(value):
        return value
    raise ValueError("must be a Lightning address (user@domain, lower case) or a bech32 LNURL (lnurl1...)")
