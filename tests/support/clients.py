"""Real mail clients that nobody here wrote, sending one message each through smtpgate.

`submit(client, ...)` runs swaks, msmtp or curl (Debian packages) as a process, or
Python's smtplib in a thread, against a submission listener (tests/support/submission.py)
with STARTTLS or implicit TLS, AUTH PLAIN or LOGIN. It returns what the client said
(exit status and its transcript) so a test can check it sent, or which reply it saw.
Postfix as a client is `PostfixClient`: a private instance (tests/support/postfix.py)
whose smtp client relays to smtpgate, one master.cf transport per listener kind and
mechanism, chosen by the envelope sender.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
from dataclasses import dataclass
from pathlib import Path

from tests.support.postfix import PostfixInstance
from tests.support.submission import Submission

__all__ = ["CLIENTS", "PROGRAMS", "Attempt", "Outcome", "PostfixClient", "missing_program", "submit"]

# The clients run as processes, and the Debian package each comes in.
PROGRAMS = {"swaks": "swaks", "msmtp": "msmtp", "curl": "curl"}
CLIENTS = ("swaks", "msmtp", "curl", "smtplib")

# How long one client may take for one message.
CLIENT_TIMEOUT = 30


@dataclass(frozen=True)
class Attempt:
    """One message a client is asked to send."""

    security: str  # starttls | implicit
    mechanism: str  # PLAIN | LOGIN
    user: str
    password: str
    mail_from: str
    rcpts: tuple[str, ...]
    message: bytes  # CRLF line ends

    @property
    def name(self) -> str:
        return f"{self.security}-{self.mechanism.lower()}"


@dataclass(frozen=True)
class Outcome:
    status: int  # the client's exit status (smtplib: 0, or 1 after an exception)
    transcript: str  # what it printed, the server's replies among it

    @property
    def sent(self) -> bool:
        return self.status == 0


def missing_program(client: str) -> str | None:
    """Why a client cannot run here, or None."""
    program = PROGRAMS.get(client)
    if program and shutil.which(program) is None:
        return f"the Debian package {program} is not installed"
    return None


async def submit(client: str, target: Submission, attempt: Attempt, folder: Path) -> Outcome:
    """Have `client` send `attempt` through the listener of its security kind."""
    folder.mkdir(parents=True, exist_ok=True)
    message = folder / "message.eml"
    message.write_bytes(attempt.message)
    if client == "smtplib":
        return await asyncio.to_thread(_smtplib, target, attempt)
    argv, stdin = _COMMANDS[client](target, attempt, folder, message)
    return await _run(argv, stdin)


def _swaks(target: Submission, a: Attempt, folder: Path, message: Path) -> tuple[list[str], bytes | None]:
    # --no-data-fixup sends the file as the DATA part, exactly (no tokens, no added blank
    # line): the file is that part as it goes on the wire, dot-stuffed, with its final dot.
    wire = folder / "data.txt"
    stuffed = a.message.replace(b"\r\n.", b"\r\n..")
    wire.write_bytes((b"." if stuffed.startswith(b".") else b"") + stuffed + b".\r\n")
    tls = "--tls" if a.security == "starttls" else "--tls-on-connect"
    argv = ["swaks", "--server", "127.0.0.1", "--port", str(target.port(a.security)), tls,
            "--tls-verify", "--tls-ca-path", target.cafile, "--tls-sni", "localhost",
            "--auth", a.mechanism, "--auth-user", a.user, "--auth-password", a.password,
            "--from", a.mail_from, "--to", ",".join(a.rcpts), "--helo", "swaks.test",
            "--data", f"@{wire}", "--no-data-fixup", "--timeout", str(CLIENT_TIMEOUT)]
    return argv, None


def _msmtp(target: Submission, a: Attempt, folder: Path, message: Path) -> tuple[list[str], bytes | None]:
    config = folder / "msmtprc"
    config.write_text(
        "account gate\n"
        "host 127.0.0.1\n"
        f"port {target.port(a.security)}\n"
        "tls on\n"
        f"tls_starttls {'on' if a.security == 'starttls' else 'off'}\n"
        f"tls_trust_file {target.cafile}\n"
        "tls_host_override localhost\n"
        f"auth {a.mechanism.lower()}\n"
        f"user {a.user}\n"
        f'password "{a.password}"\n'
        f"from {a.mail_from}\n"
        "domain msmtp.test\n"
        f"timeout {CLIENT_TIMEOUT}\n"
    )
    config.chmod(0o600)  # msmtp refuses a password file others may read
    return ["msmtp", "-v", "-C", str(config), "-a", "gate", "--", *a.rcpts], message.read_bytes()


def _curl(target: Submission, a: Attempt, folder: Path, message: Path) -> tuple[list[str], bytes | None]:
    scheme = "smtp" if a.security == "starttls" else "smtps"
    argv = ["curl", "-v", "-sS", "--url", f"{scheme}://localhost:{target.port(a.security)}/curl.test",
            "--resolve", f"localhost:{target.port(a.security)}:127.0.0.1",
            "--ssl-reqd", "--cacert", target.cafile, "--user", f"{a.user}:{a.password}",
            "--login-options", f"AUTH={a.mechanism}", "--mail-from", a.mail_from,
            "--upload-file", str(message), "--max-time", str(CLIENT_TIMEOUT)]
    for rcpt in a.rcpts:
        argv += ["--mail-rcpt", rcpt]
    return argv, None


_COMMANDS = {"swaks": _swaks, "msmtp": _msmtp, "curl": _curl}


async def _run(argv: list[str], stdin: bytes | None) -> Outcome:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(process.communicate(stdin), CLIENT_TIMEOUT + 10)
    except TimeoutError:
        process.kill()  # our own child
        out, _ = await process.communicate()
        return Outcome(-1, out.decode("utf-8", "replace") + "\n[timed out]")
    return Outcome(process.returncode or 0, out.decode("utf-8", "replace"))


def _smtplib(target: Submission, a: Attempt) -> Outcome:
    """Python's smtplib as a script would use it; the mechanism is chosen, not negotiated."""
    context = target.client_context()
    port = target.port(a.security)
    lines: list[str] = []
    try:
        if a.security == "implicit":
            client = smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="smtplib.test", context=context,
                                      timeout=CLIENT_TIMEOUT)
        else:
            client = smtplib.SMTP("127.0.0.1", port, local_hostname="smtplib.test", timeout=CLIENT_TIMEOUT)
        with client:
            client.ehlo()
            if a.security == "starttls":
                client.starttls(context=context)
                client.ehlo()
            client.user, client.password = a.user, a.password
            if a.mechanism == "PLAIN":
                lines.append(str(client.auth("PLAIN", client.auth_plain)))
            else:  # no initial response: both challenges are answered
                lines.append(str(client.auth("LOGIN", client.auth_login, initial_response_ok=False)))
            refused = client.sendmail(a.mail_from, list(a.rcpts), a.message)
            lines.append(f"refused: {refused}")
        return Outcome(0, "\n".join(lines))
    except (smtplib.SMTPException, OSError) as exc:
        detail = f"{exc.smtp_code} {exc.smtp_error.decode('utf-8', 'replace')}" if hasattr(exc, "smtp_code") else ""
        return Outcome(1, "\n".join([*lines, f"{type(exc).__name__}: {exc} {detail}"]))


class PostfixClient:
    """Postfix's smtp client relaying to smtpgate with smtp_sasl_auth_enable.

    Each envelope sender picks its transport (sender_dependent_default_transport_maps):
    `gate_starttls_plain`, `gate_implicit_login` and so on, the implicit ones with
    smtp_tls_wrappermode (a 465-style relayhost), each with its own
    smtp_sasl_mechanism_filter; each sender has its own credentials
    (smtp_sender_dependent_authentication), so one of them can be wrong.
    """

    def __init__(self, folder: Path, target: Submission, attempts: list[Attempt]) -> None:
        services = []
        for security in ("starttls", "implicit"):
            for mechanism in ("plain", "login"):
                wrapper = " -o smtp_tls_wrappermode=yes" if security == "implicit" else ""
                services.append(f"gate_{security}_{mechanism} unix - - n - - smtp"
                                f" -o smtp_sasl_mechanism_filter={mechanism}{wrapper}")
        tables = {
            "sasl_passwd": "".join(f"{a.mail_from} {a.user}:{a.password}\n" for a in attempts),
            "sender_transport": "".join(
                f"{a.mail_from} gate_{a.security}_{a.mechanism.lower()}:[127.0.0.1]:{target.port(a.security)}\n"
                for a in attempts),
        }
        self.instance = PostfixInstance(folder, mailboxes=(), services=services, tables=tables, main_cf={
            "smtp_sasl_auth_enable": "yes",
            "smtp_sender_dependent_authentication": "yes",
            # PLAIN and LOGIN are plaintext mechanisms: allowed here, over TLS only.
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            "smtp_tls_security_level": "encrypt",
            "smtp_sasl_password_maps": "texthash:${config_directory}/sasl_passwd",
            "sender_dependent_default_transport_maps": "texthash:${config_directory}/sender_transport",
            "smtp_helo_name": "postfix.test",
        })

    def start(self) -> None:
        self.instance.start()

    def stop(self) -> None:
        self.instance.stop()

    def inject(self, attempt: Attempt) -> None:
        """Hand the message to Postfix's smtpd; its queue then relays it to smtpgate."""
        with smtplib.SMTP(self.instance.host, self.instance.port, timeout=CLIENT_TIMEOUT) as client:
            client.sendmail(attempt.mail_from, list(attempt.rcpts), attempt.message)

    async def wait_for_log(self, text: str, timeout: float = 30) -> str:
        """The maillog once it holds text; TimeoutError with the log when it does not."""
        try:
            async with asyncio.timeout(timeout):
                while text not in (log := self.instance.maillog()):
                    await asyncio.sleep(0.05)  # polling a file Postfix appends to
                return log
        except TimeoutError:
            raise TimeoutError(f"{text!r} not in Postfix's maillog after {timeout}s:\n"
                               f"{self.instance.maillog()}") from None

