"""The http allocator (`allocator: {kind: http}`) against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp import web

from smtpgate.store.allocation import AllocationError, HttpAllocator
from smtpgate.store import AllocationContext, LinkOutcome, LinkTarget, StoreError, open_store
from tests.store_helpers import pg_database, store_url  # noqa: F401

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
PATTERN = re.compile(r"[0-9]{1,12}-[TCA]")
TARGET = LinkTarget(PL, "Team B (Poland)", "{n}-T", True)
CTX = AllocationContext(subject="Payroll 101203-T", from_="anna@corp.example", message_id="<m1@corp.example>")


def accepts_json(accept: str) -> bool:
    """Whether an Accept header names JSON itself (media types ignore case; `*/*` gets the page)."""
    return any(part.split(";")[0].strip().lower() == "application/json" for part in accept.split(","))


class Allocation:
    """A loopback HTTP allocator whose answer each test chooses.

    `negotiating`: as a service for people and programs alike, it answers its HTML page
    unless the request's Accept names JSON."""

    def __init__(self) -> None:
        self.answer: web.Response | None = None
        self.requests: list[tuple[dict, str | None]] = []
        self.release = asyncio.Event()  # a hanging answer waits for this
        self.url = ""
        self.negotiating = False

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((await request.json(), request.headers.get("Authorization")))
        if self.negotiating and not accepts_json(request.headers.get("Accept", "")):
            return web.Response(text="<html><body>Linked activities</body></html>", content_type="text/html")
        if self.answer is None:
            await self.release.wait()
            return web.json_response({"reference": "1-T"})
        return self.answer


@pytest.fixture
async def service():
    allocation = Allocation()
    app = web.Application()
    app.router.add_post("/api/linked-activities", allocation.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    allocation.url = f"http://{host}:{port}/api/linked-activities"
    yield allocation
    allocation.release.set()
    await runner.cleanup()


@pytest.fixture
async def store(store_url, tmp_path: Path, service):  # noqa: F811
    allocator = HttpAllocator(service.url, "s3cret-token", timeout=0.5, matcher=PATTERN.fullmatch)
    s = await open_store(store_url, base_dir=tmp_path, allocator=allocator)
    yield s
    await s.close()


async def assert_nothing_written(store) -> None:
    assert await store.show("101203-T") is None
    assert await store.list_links() == []


async def test_a_good_answer_creates_the_link(store, service):
    service.answer = web.json_response({"reference": "5512-C"}, status=201)
    outcome = await store.get_or_create_link("101203-T", UK, TARGET, CTX)
    assert outcome == LinkOutcome("5512-C", created=True)
    assert await store.activity_mailbox("5512-C") == PL
    body, authorization = service.requests[0]
    assert body == {
        "source_reference": "101203-T",
        "mailbox": PL,
        "team": "Team B (Poland)",
        "subject": "Payroll 101203-T",
        "from": "anna@corp.example",
        "message_id": "<m1@corp.example>",
    }
    assert authorization == "Bearer s3cret-token"
    # Reused afterwards without asking again.
    assert await store.get_or_create_link("101203-T", UK, TARGET, CTX) == LinkOutcome("5512-C", False)
    assert len(service.requests) == 1


async def test_the_allocator_asks_for_json(store, service):
    """A service that answers people with a page and programs with JSON: smtpgate gets JSON."""
    service.negotiating = True
    service.answer = web.json_response({"reference": "5512-C"}, status=201)
    assert await store.get_or_create_link("101203-T", UK, TARGET, CTX) == LinkOutcome("5512-C", created=True)


LONG = "9" * 100 + "-T"  # too long for the pattern; the error shows its repr cut to 80 characters


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        pytest.param(lambda: web.json_response({"error": "no"}, status=403), "answered HTTP 403", id="refusal"),
        pytest.param(lambda: web.json_response({"reference": "T-5512"}),
                     "answered reference 'T-5512', which does not match references.pattern", id="pattern-mismatch"),
        pytest.param(lambda: web.json_response({"reference": "5512-C trailing"}),
                     "answered reference '5512-C trailing', which does not match references.pattern",
                     id="partial-match"),
        pytest.param(lambda: web.json_response({"reference": LONG}),
                     f"answered reference '{LONG[:79]}, which does not match references.pattern", id="long"),
        pytest.param(lambda: web.json_response({"reference": 5512}),
                     "answered reference 5512, which does not match references.pattern", id="not-a-string"),
        pytest.param(lambda: web.Response(text="<html>ok</html>"), "answered something that is not JSON",
                     id="not-json"),
        pytest.param(lambda: web.json_response(["5512-C"]),
                     "answered reference None, which does not match references.pattern", id="not-an-object"),
        pytest.param(lambda: web.Response(status=500), "answered HTTP 500", id="server-error"),
    ],
)
async def test_a_bad_answer_fails_saying_what_was_answered_and_writes_nothing(store, service, answer, said):
    service.answer = answer()
    with pytest.raises(AllocationError) as caught:
        await store.get_or_create_link("101203-T", UK, TARGET, CTX)
    assert isinstance(caught.value, StoreError)
    assert str(caught.value) == f"allocator: {service.url}: {said}"
    assert "s3cret-token" not in str(caught.value)
    await assert_nothing_written(store)


async def test_a_timeout_fails_and_writes_nothing(store, service):
    service.answer = None  # the service never answers in time
    with pytest.raises(AllocationError, match="no answer within"):
        await store.get_or_create_link("101203-T", UK, TARGET, CTX)
    await assert_nothing_written(store)
    # The store is usable afterwards: nothing stayed locked.
    service.answer = web.json_response({"reference": "5512-C"})
    assert (await store.get_or_create_link("101203-T", UK, TARGET, CTX)).reference == "5512-C"


async def test_an_unreachable_allocator_fails_and_writes_nothing(store_url, tmp_path):  # noqa: F811
    allocator = HttpAllocator("http://127.0.0.1:9/none", None, timeout=2, matcher=PATTERN.fullmatch)
    s = await open_store(store_url, base_dir=tmp_path, allocator=allocator)
    try:
        with pytest.raises(AllocationError):
            await s.get_or_create_link("101203-T", UK, TARGET, CTX)
        await assert_nothing_written(s)
    finally:
        await s.close()


async def test_a_reference_owned_by_another_mailbox_is_refused(store, service):
    await store.record_activity("5512-C", "de-payroll@corp.example")
    service.answer = web.json_response({"reference": "5512-C"})
    with pytest.raises(AllocationError, match="belongs to"):
        await store.get_or_create_link("101203-T", UK, TARGET, CTX)
    await assert_nothing_written(store)


async def test_racing_nodes_ask_the_allocator_once(store_url, tmp_path, service):  # noqa: F811
    service.answer = web.json_response({"reference": "5512-C"})
    nodes = [
        await open_store(
            store_url,
            base_dir=tmp_path,
            allocator=HttpAllocator(service.url, "t", timeout=5, matcher=PATTERN.fullmatch),
        )
        for _ in range(2)
    ]
    try:
        outcomes = await asyncio.gather(
            *(n.get_or_create_link("101203-T", UK, TARGET, CTX) for n in nodes for _ in range(10))
        )
        assert {o.reference for o in outcomes} == {"5512-C"}
        assert sum(o.created for o in outcomes) == 1
        assert len(service.requests) == 1
    finally:
        for n in nodes:
            await n.close()


def test_the_repr_names_the_service_but_not_the_token():
    """What a log line or a traceback shows of the allocator: where it asks, never its token."""
    allocator = HttpAllocator("http://127.0.0.1/x", "s3cret-token", 1, PATTERN.fullmatch)
    shown = repr(allocator)
    assert "s3cret" not in shown
    assert "http://127.0.0.1/x" in shown
