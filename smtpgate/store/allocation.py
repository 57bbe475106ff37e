"""Where a new linked activity's reference comes from (`allocator:` in the configuration).

An allocator is called by the store inside the transaction that creates the
link, while the store holds the lock for that (source activity, mailbox)
pair: a failure rolls everything back, and no other process or node can
allocate for the same pair at the same time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

import aiohttp

from smtpgate.log import outage, plain_words
from smtpgate.store.base import AllocationRequest, Allocator, NumberSource
from smtpgate.store.errors import AllocationError

__all__ = [
    "AllocationError",
    "AllocationRequest",
    "Allocator",
    "HttpAllocator",
    "LocalAllocator",
    "NumberSource",
]

# A template that only yields references the store already knows is broken;
# stop instead of spinning through the sequence.
_MAX_SKIPS = 1000


class LocalAllocator:
    """`allocator.kind: local`: the store's own sequence through the mailbox's template.

    templates are the mailboxes' new_reference templates: when the store
    opens, its sequence is raised above every reference they gave that the
    store knows (Store.raise_sequence).
    """

    def __init__(self, first_number: int = 900000, templates: Sequence[str] = ("{n}-T",)) -> None:
        self.first_number = first_number
        self.templates = tuple(templates)

    async def allocate(self, request: AllocationRequest, numbers: NumberSource) -> str:
        """`new_reference.format(n=...)` for the next number whose reference is neither
        known to the store nor the source reference."""
        for _ in range(_MAX_SKIPS):
            n = await numbers.next_number(self.first_number)
            try:
                reference = request.new_reference.format(n=n)
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise AllocationError(
                    f"new_reference template {request.new_reference!r} of {request.mailbox} "
                    f"cannot be formatted: {exc!r}"
                ) from None
            if reference != request.source_reference and not await numbers.is_known(reference):
                return reference
        raise AllocationError(
            f"new_reference template {request.new_reference!r} gave only known references"
        )


class HttpAllocator:
    """`allocator.kind: http`: POST the request to the work-management system.

    The answer must be HTTP 200 or 201 with `{"reference": "..."}` matching
    references.pattern (checked by `matcher`); anything else, a timeout or a
    connection failure raises AllocationError.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float,
        matcher: Callable[[str], bool],
    ) -> None:
        self.url = url
        self._token = token
        self.timeout = timeout
        self._matcher = matcher

    def __repr__(self) -> str:
        # The token stays out of reprs, and so out of logs and tracebacks.
        return f"HttpAllocator(url={self.url!r}, timeout={self.timeout})"

    async def allocate(self, request: AllocationRequest, numbers: NumberSource) -> str:
        """The reference the allocator service answered; one HTTP call, no retry.

        A failure is an allocator outage (`component.failed`), the next answer its end."""
        try:
            reference = await self._call(request)
        except AllocationError as exc:
            outage("allocator").failed(str(exc))
            raise
        outage("allocator").ok()
        return reference

    async def _call(self, request: AllocationRequest) -> str:
        payload = {
            "source_reference": request.source_reference,
            "mailbox": request.mailbox,
            "team": request.team,
            "subject": request.subject,
            "from": request.from_,
            "message_id": request.message_id,
        }
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        where = f"allocator: {self.url}"
        try:
            # A session per call: new links are rare and this keeps no state
            # bound to an event loop between calls.
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as session:
                async with session.post(self.url, json=payload, headers=headers) as resp:
                    if resp.status not in (200, 201):
                        raise AllocationError(f"{where}: answered HTTP {resp.status}")
                    raw = await resp.read()
        except asyncio.TimeoutError:
            raise AllocationError(f"{where}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise AllocationError(f"{where}: {plain_words(exc)}") from None
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise AllocationError(f"{where}: answered something that is not JSON") from None
        reference = answer.get("reference") if isinstance(answer, dict) else None
        if not isinstance(reference, str) or not self._matcher(reference):
            shown = repr(reference)[:80]
            raise AllocationError(f"{where}: answered reference {shown}, which does not match references.pattern")
        return reference
