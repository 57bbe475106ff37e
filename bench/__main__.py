"""`make bench`: relay throughput over loopback and the core's rewrite speed.

Numbers are printed, not asserted: speed goals are read here, never in tests.
Each run is bounded (message count and a time cap) and uses loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpgate.config import load_config  # noqa: E402
from smtpgate.runtime.gate import Gate  # noqa: E402
from smtpgate.log import setup_logging  # noqa: E402
from smtpgate.mail.rewrite import rewrite_headers  # noqa: E402
from tests.support.sink import Sink  # noqa: E402

SENDER = "uk-payroll+101203-T@corp.example"
MESSAGE = (
    b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
    b"To: Client <client@supplier.example>\r\n"
    b"Cc: Team B <pl-payroll@corp.example>, hr@corp.example\r\n"
    b"Subject: Invoice 4411\r\n"
    b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n" + b"body line of some length for the benchmark\r\n" * 200
)


async def relay_bench(messages: int, concurrency: int, cap_seconds: float) -> None:
    import aiosmtplib

    setup_logging("json", "warning")
    with tempfile.TemporaryDirectory() as folder:
        async with Sink(data_size_limit=50_000_000) as sink:
            cfg = Path(folder) / "smtpgate.yaml"
            cfg.write_text(f"""\
listeners:
  - name: bench
    address: 127.0.0.1:0
    relay_networks: [127.0.0.0/8]
upstream:
  url: smtp://127.0.0.1:{sink.port}
internal_domains: [corp.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A
  - address: pl-payroll@corp.example
    team: Team B
store:
  url: sqlite:bench.db
  auto_upgrade: true
""")
            gate = Gate(load_config(cfg))
            await gate.start()
            port = gate.bound[0][1]
            latencies: list[float] = []
            deadline = time.monotonic() + cap_seconds
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(messages):
                queue.put_nowait(i)

            async def worker() -> None:
                client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
                await client.connect()
                while not queue.empty() and time.monotonic() < deadline:
                    i = queue.get_nowait()
                    data = MESSAGE.replace(b"Subject: Invoice 4411", b"Subject: Invoice %d" % i)
                    start = time.perf_counter()
                    await client.sendmail(SENDER,
                                          ["client@supplier.example", "pl-payroll@corp.example"], data)
                    latencies.append(time.perf_counter() - start)
                await client.quit()

            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            await gate.drain(0)
            done = len(latencies)
            latencies.sort()
            print(f"relay: {done} messages ({len(MESSAGE)} octets, 2 recipients, one link) "
                  f"with {concurrency} clients in {elapsed:.2f}s = {done / elapsed:.0f} msg/s; "
                  f"latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
                  f"p95 {latencies[int(done * 0.95) - 1] * 1000:.1f} ms; "
                  f"peak RSS of the process (client, smtpgate and sink) {peak / 1e6:.1f} MB; sink got {len(sink.messages)}")


def rewrite_bench(rounds: int) -> None:
    mapping = {"pl-payroll@corp.example": "pl-payroll+900000-T@corp.example"}
    began = time.perf_counter()
    for _ in range(rounds):
        rewrite_headers(MESSAGE, mapping)
    elapsed = time.perf_counter() - began
    print(f"rewrite: {rounds} header rewrites in {elapsed:.2f}s = {rounds / elapsed:.0f}/s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0, help="cap on the relay run")
    parser.add_argument("--rewrites", type=int, default=5000)
    args = parser.parse_args()
    rewrite_bench(args.rewrites)
    asyncio.run(relay_bench(args.messages, args.concurrency, args.seconds))


if __name__ == "__main__":
    main()
