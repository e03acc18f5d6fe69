"""Free text a client sends (a journal entry's ``reference``, say): the characters it may not
hold, decided in one place for every such field.

Refused: every character of the Unicode categories

- ``Cc``: the C0 controls (NUL, ESC which starts an ANSI escape sequence, and also tab, line
  feed and carriage return: a reference is one line), DEL and the C1 controls;
- ``Cf``: format characters, which are invisible: the bidirectional marks, embeddings,
  overrides and isolates (U+061C, U+200E/F, U+202A-E, U+2066-9: "Trojan Source" reordering),
  zero-width space, word joiner, soft hyphen, the byte-order mark, the tag characters
  (U+E0000 block, which smuggle invisible text);
- ``Zl``, ``Zp``: the line and paragraph separators (U+2028, U+2029);
- ``Cs``: lone surrogates (the JSON parser already refuses them);

except ZERO WIDTH NON-JOINER and ZERO WIDTH JOINER (U+200C, U+200D), which writing Persian or
Indic words and emoji sequences needs, and which reorder or hide nothing. Each refused
character would otherwise be stored, shown to whoever reads the journal (a terminal, a
log, a page), and escaped in JSON to 6 bytes.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
ALLOWED_FORMAT_CHARACTERS = frozenset({"\u200c", "\u200d"})
# The error type in a 422's details (``validation_error``), stable for clients.
FORBIDDEN_CHARACTER = "forbidden_character"
_KINDS = {
    "Cc": "a control character",
    "Cf": "a format character",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
_ASCII_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")


def is_forbidden(character: str) -> bool:
    return (
        unicodedata.category(character) in FORBIDDEN_CATEGORIES
        and character not in ALLOWED_FORMAT_CHARACTERS
    )


def forbidden_character(text: str) -> str | None:
    """The first character of ``text`` free text may not hold, or None."""
    if text.isascii():  # the common case, one regex scan
        found = _ASCII_FORBIDDEN.search(text)
        return found.group() if found else None
    return next((character for character in text if is_forbidden(character)), None)


def check_free_text(text: str) -> str:
    """``text`` unchanged, or a validation error (type ``forbidden_character``) naming the
    first character it may not hold."""
    character = forbidden_character(text)
    if character is not None:
        category = unicodedata.category(character)
        named = unicodedata.name(character, "")
        raise PydanticCustomError(
            FORBIDDEN_CHARACTER,
            "holds {character}, {kind}: free text may not hold control, format "
            "(bidirectional, zero-width) or separator characters",
            {
                "character": f"U+{ord(character):04X}" + (f" {named}" if named else ""),
                "kind": _KINDS[category],
            },
        )
    return text


@cache
def documented_pattern() -> str:
    """The refusal as a JSON Schema ``pattern`` (ECMA-262, ``\\uXXXX`` escapes): the Basic
    Multilingual Plane's refused characters. Those beyond it (tags, a few format characters)
    a UTF-16 pattern cannot name in one class; the description says so, and the validator
    refuses them all the same."""
    ranges: list[list[int]] = []
    for point in range(0x10000):
        if 0xD800 <= point <= 0xDFFF or not is_forbidden(chr(point)):
            continue
        if ranges and ranges[-1][1] == point - 1:
            ranges[-1][1] = point
        else:
            ranges.append([point, point])
    parts = "".join(
        f"\\u{first:04x}" if first == last else f"\\u{first:04x}-\\u{last:04x}"
        for first, last in ranges
    )
    return f"^[^{parts}]*$"


FREE_TEXT_DESCRIPTION = (
    "No control, format (bidirectional, zero-width, tag) or line/paragraph separator "
    "characters (Unicode Cc, Cf, Zl, Zp, except U+200C and U+200D): 422 `validation_error`, "
    f"details type `{FORBIDDEN_CHARACTER}`."
)


class FreeTextRule:
    """``Annotated`` metadata making a ``str`` field free text: validated by
    ``check_free_text`` after its other constraints, and documented in its JSON schema."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(check_free_text, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = documented_pattern()
        described = json_schema.get("description")
        json_schema["description"] = (
            f"{described} {FREE_TEXT_DESCRIPTION}" if described else FREE_TEXT_DESCRIPTION
        )
        return json_schema


# Every free-text field a client sends: ``Annotated[str, Field(...), FREE_TEXT]``.
FREE_TEXT = FreeTextRule()
