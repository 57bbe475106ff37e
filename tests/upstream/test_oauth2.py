"""Reading a token endpoint's answer (smtpgate/upstream/oauth2.py): its size
limit, the fields it checks, how much of a bad value a refusal quotes, and the
secret it keeps out of the reason."""

from __future__ import annotations

import json

import pytest

from smtpgate.upstream.oauth2 import MAX_LIFETIME, MAX_RESPONSE, TokenError, _parse

URL = "https://login.example/token"


def answer(doc: dict, status: int = 200, secret: str = "s3cret") -> tuple[str, float]:
    return _parse(status, json.dumps(doc).encode(), URL, secret)


def refusal(doc: dict, status: int = 200, secret: str = "s3cret") -> str:
    with pytest.raises(TokenError) as refused:
        answer(doc, status, secret)
    return str(refused.value)


def test_an_answer_of_max_response_bytes_is_read_and_a_longer_one_is_not():
    doc = {"access_token": "tok", "expires_in": 60, "pad": ""}
    doc["pad"] = "x" * (MAX_RESPONSE - len(json.dumps(doc)))
    body = json.dumps(doc).encode()
    assert len(body) == MAX_RESPONSE
    assert _parse(200, body, URL, "s3cret") == ("tok", 60.0)
    with pytest.raises(TokenError, match="answered 200 without a JSON object"):
        _parse(200, body + b" ", URL, "s3cret")


@pytest.mark.parametrize("token", ["", 5, "tab\there"])
def test_an_access_token_that_is_not_printable_text_is_refused(token):
    assert refusal({"access_token": token}) == f"token endpoint {URL} answered 200 without an access_token"


def test_a_refusal_quotes_40_characters_of_a_bad_type_or_lifetime():
    long = "y" * 60
    assert refusal({"access_token": "tok", "token_type": long}) == (
        f"token endpoint {URL} gave a token of type {'y' * 40!r}, not Bearer")
    assert refusal({"access_token": "tok", "expires_in": long}) == (
        f"token endpoint {URL} gave expires_in {'y' * 40!r}, not a number")


def test_a_lifetime_under_a_second_is_still_a_lifetime():
    assert answer({"access_token": "tok", "expires_in": "0.5"}) == ("tok", 0.5)


def test_an_error_quotes_200_characters_of_its_description_without_the_secret():
    reason = refusal({"error": "invalid_client", "error_description": "d" * 250}, status=401)
    assert reason == f"token endpoint {URL} answered HTTP 401: invalid_client: {'d' * 200}"
    reason = refusal({"error": "invalid_client", "error_description": "bad secret s3cret"}, status=401)
    assert reason == f"token endpoint {URL} answered HTTP 401: invalid_client: bad secret [secret]"
    assert refusal({"error": "x"}, status=500, secret="") == f"token endpoint {URL} answered HTTP 500: x"


def test_a_lifetime_beyond_any_float_is_a_long_one_capped_as_any_other():
    assert answer({"access_token": "tok", "expires_in": 10 ** 400}) == ("tok", MAX_LIFETIME)
