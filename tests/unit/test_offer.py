"""What the legacy server offered -> the [target] keys, and what doctor calls a shortfall (pure)."""

from __future__ import annotations

from sidecar import config
from sidecar.legacy.offer import POSTFIX_DEFAULT_SIZE, LegacyOffer, SmtpOffer, settings, shortfalls


def _offer(*, smtp: SmtpOffer | None = None, smtps: SmtpOffer | None = None, plain: bool | None = False) -> LegacyOffer:
    return LegacyOffer(
        smtp or SmtpOffer(25, True), SmtpOffer(587, True, ("PLAIN",), False, 1000), smtps or SmtpOffer(465), plain
    )


def test_a_modest_legacy_server_asks_for_nothing_more() -> None:
    want = settings(_offer())
    assert want == {"smtps": False, "smtp_auth_on_25": False, "plaintext_auth": False,
                    "message_size_limit": POSTFIX_DEFAULT_SIZE}  # fmt: skip
    assert shortfalls(config.Config(), _offer()) == []


def test_each_thing_legacy_offered_is_asked_for() -> None:
    offer = _offer(
        smtp=SmtpOffer(25, True, ("PLAIN", "LOGIN"), True, 52428800),
        smtps=SmtpOffer(465, True, ("PLAIN",), False, None),
        plain=True,
    )
    assert settings(offer) == {"smtps": True, "smtp_auth_on_25": True, "plaintext_auth": True,
                               "message_size_limit": 52428800}  # fmt: skip
    assert shortfalls(config.Config(), offer) == [
        "smtps = true", "smtp_auth_on_25 = true", "plaintext_auth = true", "message_size_limit = 52428800"
    ]  # fmt: skip
    enough = config.from_dict({"target": {"smtps": True, "smtp_auth_on_25": True, "plaintext_auth": True,
                                          "message_size_limit": 0}})  # fmt: skip
    assert shortfalls(enough, offer) == []


def test_size_zero_means_no_limit() -> None:
    offer = _offer(smtp=SmtpOffer(25, True, (), False, 0))
    assert settings(offer)["message_size_limit"] == 0
    assert shortfalls(config.Config(), offer) == ["message_size_limit = 0"]
