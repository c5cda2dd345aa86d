"""The webhook signature check against MLflow's own signing code."""

from __future__ import annotations

import time

from mlflow.webhooks.delivery import _generate_hmac_signature

from captchaops.serving.webhook import TOLERANCE_S, sign, verify

SECRET = "s3cret-value"
BODY = b'{"entity": "model_version_alias", "action": "created", "data": {"name": "m"}}'


def headers(signature: str, timestamp: str, delivery_id: str = "d-1") -> dict[str, str]:
    return {
        "x-mlflow-signature": signature,
        "x-mlflow-timestamp": timestamp,
        "x-mlflow-delivery-id": delivery_id,
    }


def test_sign_matches_mlflow() -> None:
    now = str(int(time.time()))
    theirs = _generate_hmac_signature(SECRET, "d-1", now, BODY.decode())
    assert sign(SECRET, "d-1", now, BODY) == theirs
    assert verify(SECRET, headers(theirs, now), BODY) is None


def test_refusals_name_their_reason() -> None:
    now = int(time.time())
    good = _generate_hmac_signature(SECRET, "d-1", str(now), BODY.decode())
    assert "does not match" in str(verify("other", headers(good, str(now)), BODY))
    assert "does not match" in str(verify(SECRET, headers(good, str(now)), BODY + b" "))
    assert "does not match" in str(verify(SECRET, headers(good, str(now), "d-2"), BODY))
    assert "missing" in str(verify(SECRET, headers("", str(now)), BODY))
    assert "Unix seconds" in str(verify(SECRET, headers(good, "soon"), BODY))
    old = str(now - TOLERANCE_S - 5)
    stale = _generate_hmac_signature(SECRET, "d-1", old, BODY.decode())
    assert "clock" in str(verify(SECRET, headers(stale, old), BODY))
    assert verify(SECRET, headers(stale, old), BODY, now=now - TOLERANCE_S) is None


def test_any_of_several_signatures_may_match() -> None:
    now = str(int(time.time()))
    good = _generate_hmac_signature(SECRET, "d-1", now, BODY.decode())
    assert verify(SECRET, headers(f"v1,AAAA {good}", now), BODY) is None
    assert verify(SECRET, headers("v1,AAAA v1,BBBB", now), BODY) is not None
