"""Reference recognition: references.pattern in a tag, a header or the Subject."""

from __future__ import annotations

import pytest

from smtpgate.linking.references import DEFAULT_PATTERN, ReferenceMatcher

DEFAULT = ReferenceMatcher(DEFAULT_PATTERN)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("101203-T", True),
        ("5512-C", True),
        ("77-A", True),
        ("123456789012-T", True),
        ("1234567890123-T", False),
        ("101203-X", False),
        ("101203-t", False),
        ("101203-TT", False),
        (" 101203-T", False),
        ("-T", False),
        ("", False),
    ],
)
def test_fullmatch(text: str, expected: bool) -> None:
    assert DEFAULT.fullmatch(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Re: [101203-T] payslip", "101203-T"),
        ("101203-T", "101203-T"),
        ("Case 5512-C, action 77-A", "5512-C"),
        ("Ticket#101203-T.", "101203-T"),
        ("(101203-T)", "101203-T"),
        ("ref:101203-T", "101203-T"),
        ("x101203-TT", None),
        ("abc5512-Cx", None),
        ("x101203-T", None),
        ("101203-Tx 5512-C", "5512-C"),
        ("a_101203-T", None),
        ("101203-T_b", None),
        ("é101203-T", None),
        ("1234567890123-T", None),
        ("no reference here", None),
        ("", None),
    ],
)
def test_search(text: str, expected: str | None) -> None:
    assert DEFAULT.search(text) == expected


def test_custom_pattern() -> None:
    matcher = ReferenceMatcher(r"[0-9]{1,12}-[TCA]|T-[0-9]{4}")
    assert matcher.fullmatch("T-1234")
    assert matcher.fullmatch("101203-T")
    assert matcher.search("Re: T-1234 and 5-C") == "T-1234"
    assert matcher.search("AT-1234") is None
    assert matcher.pattern == r"[0-9]{1,12}-[TCA]|T-[0-9]{4}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("101203-T", "101203-T"), ("101203-t", "101203-T"), ("101203-x", None), ("abc", None)],
)
def test_normalize(text: str, expected: str | None) -> None:
    assert DEFAULT.normalize(text) == expected


@pytest.mark.parametrize("pattern", ["[0-9", "(", "[0-9]*", "a|"])
def test_invalid_pattern(pattern: str) -> None:
    with pytest.raises(ValueError):
        ReferenceMatcher(pattern)


@pytest.mark.parametrize(("pattern", "problem"), [
    ("[0-9", "invalid reference pattern '\\[0-9'"),
    ("[0-9]*", "reference pattern '\\[0-9\\]\\*' matches the empty string"),
])
def test_invalid_pattern_is_named_with_its_problem(pattern: str, problem: str) -> None:
    """The message ends up in check-config's output: it says which pattern and what is wrong."""
    with pytest.raises(ValueError, match=f"^{problem}"):
        ReferenceMatcher(pattern)
