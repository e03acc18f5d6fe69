"""Free text's forbidden characters (tandem/core/text.py), with no database."""

from __future__ import annotations

import re

from tandem.core.text import documented_pattern, forbidden_character


def test_the_documented_pattern_is_the_rule() -> None:
    """The OpenAPI pattern refuses exactly the characters of the Basic Multilingual Plane the
    validator refuses (surrogates aside: JSON cannot carry one alone)."""
    pattern = re.compile(documented_pattern())
    for point in range(0x10000):
        if 0xD800 <= point <= 0xDFFF:
            continue
        character = chr(point)
        assert (pattern.fullmatch(character) is None) == (
            forbidden_character(character) is not None
        ), f"U+{point:04X}"


def test_the_rule_names_the_first_forbidden_character() -> None:
    """ASCII and other text alike: the first forbidden character is named; joiners are kept."""
    assert forbidden_character("order-17 «ok»") is None
    assert forbidden_character("\U0001f469\u200d\U0001f4bb \u0645\u06cc\u200c") is None
    assert forbidden_character("a\tb\x1b") == "\t"
    assert forbidden_character("é\u202eb\x1b") == "\u202e"
    assert forbidden_character("tag\U000e0041") == "\U000e0041"
