"""Sending one encrypted push message: pywebpush does RFC 8291 (aes128gcm payload encryption
to the subscription's keys) and RFC 8292 (a VAPID JWT signed with our private key)."""

from __future__ import annotations

import logging
from pathlib import Path

import requests
from pywebpush import WebPushException, webpush

log = logging.getLogger(__name__)


class WebPushSender:
    def __init__(self, private_key_path: Path, subject: str, ttl_s: int, timeout_s: float):
        self.private_key = str(private_key_path)
        self.subject = subject
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s

    def __call__(self, subscription: dict, payload: bytes) -> int:
        """The push service's HTTP status; 0 when it could not be reached at all, or when
        this one subscription could not be sent to (py_vapid or the encryption refusing it):
        the notifier keeps it for the next run and goes on with the others."""
        try:
            response = webpush(
                subscription_info=subscription,
                data=payload,
                vapid_private_key=self.private_key,
                vapid_claims={"sub": self.subject},  # a fresh dict: webpush adds aud and exp to it
                content_encoding="aes128gcm",
                ttl=self.ttl_s,
                timeout=self.timeout_s,
            )
        except WebPushException as exc:
            return exc.response.status_code if exc.response is not None else 0
        except requests.RequestException as exc:
            log.warning("push service unreachable: %s", exc)
            return 0
        except Exception:
            log.exception("could not send to a subscription (the notifier logs which)")
            return 0
        return response.status_code
