"""What every section of the configuration shares: a strict, frozen pydantic model,
and `refuse`, which reports the broken rules of a check, each naming its key.

Values are read by the converters of fields.py; rules that join several keys
are model validators (or, when a key depends on keys above it, validators of
that key), and report through `refuse`, naming the key each problem is about.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

from smtpgate.config import checks


class Problem(NamedTuple):
    """One broken rule: the key it is about, relative to the model or key that checks it."""

    key: tuple[str | int, ...]
    message: str
    at: tuple[str | int, ...] | None = None  # the key whose line to name, when not `key`


def refuse(problems: list[Problem]) -> None:
    """Raise the problems of one rule check, all at once; source.py words each one."""
    if problems:
        raise PydanticCustomError("rules", "{summary}", {
            "summary": "; ".join(p.message for p in problems), "problems": tuple(problems)})


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def pem_pair_problems(cert: Path, key: Path) -> list[Problem]:
    """tls_cert must hold PEM certificates and tls_key the matching unencrypted PEM key."""
    problem = checks.pem_certificate_problem(cert)
    if problem is not None:
        return [Problem(("tls_cert",), problem)]
    problem = checks.pem_key_problem(key, cert)
    return [] if problem is None else [Problem(("tls_key",), problem)]
