"""upstream_queue_id: the queue id in the upstream's reply to the final dot, in each MTA's form."""

import pytest

from smtpgate.mail.queueid import queue_id


@pytest.mark.parametrize(("text", "expected"), [
    ("2.0.0 Ok: queued as 4Q7mXk2Z1Tz9vQ", "4Q7mXk2Z1Tz9vQ"),  # Postfix
    ("Ok: queued as 3F9A21C04B", "3F9A21C04B"),  # Postfix without enhanced codes
    ("OK id=1tSgqB-000Abc-Xy", "1tSgqB-000Abc-Xy"),  # Exim
    ("2.0.0 4B3Hx1aB012345 Message accepted for delivery", "4B3Hx1aB012345"),  # Sendmail
    ("2.6.0 <CAF=abc@mail.corp.example> [InternalId=4758823387658, Hostname=AM0PR01MB1234."
     "eurprd01.prod.exchangelabs.com] 4120 bytes in 0.056, 71.689 KB/sec Queued mail for delivery",
     "4758823387658"),  # Exchange Online
    ("2.6.0 <4411@corp.example> Queued mail for delivery", "<4411@corp.example>"),  # Exchange, no InternalId
    ("2.0.0 OK  1733300000 a1b2c3d4e5-20020a05 - gsmtp", "a1b2c3d4e5-20020a05"),  # Gmail
    ("2.0.0 Ok", None),
    ("", None),
])
def test_queue_id_in_each_form(text, expected):
    assert queue_id(text) == expected
