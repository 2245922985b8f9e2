"""Backoff: whether a failed attempt gets another, and after how long (pure functions of the
spec's `retries` and what the attempt did)."""

from __future__ import annotations

from chute.spec.model import Retries


def retry_delay(retries: Retries, failed_attempt: int) -> float:
    """Seconds to wait before the attempt after `failed_attempt` (1-based).

    Exponential: `delay`, then 2x, 4x, ... capped at `maxDelay`; no jitter (docs/file-format.md,
    Retries).
    """
    if retries.backoff == "exponential":
        delay = retries.delay * (2.0 ** (failed_attempt - 1))
    else:
        delay = retries.delay
    if retries.max_delay is not None:
        delay = min(delay, retries.max_delay)
    return delay


def should_retry(retries: Retries, failed_attempt: int, exit_code: int | None) -> bool:
    """Whether a failed attempt gets another one; `onExitCodes` limits retries to those codes."""
    if failed_attempt > retries.max:
        return False
    if retries.on_exit_codes:
        return exit_code is not None and exit_code in retries.on_exit_codes
    return True
