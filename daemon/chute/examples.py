"""Callables the example pipelines in spool/examples/ use, so they run anywhere (stdlib only)."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from chute.execution.executor import Context

log = logging.getLogger(__name__)


def measure(ctx: Context, factor: int = 1) -> dict[str, Any]:
    """One shard's work: a checksum of its item and a number derived from it."""
    item = str(ctx.shard_item if ctx.shard_item is not None else ctx.shard_index)
    digest = hashlib.sha256(item.encode()).hexdigest()
    value = int(digest[:6], 16) % 1000 * factor
    log.info("shard %s of %s: item=%s value=%d", ctx.shard_index, ctx.shard_count, item, value)
    return {"item": item, "value": value, "digest": digest[:12]}


def total(parts: list[dict[str, Any]], ctx: Context) -> dict[str, Any]:
    """Sum the shards' values; write a small report artifact and return its path."""
    values = [p["value"] for p in parts]
    path = os.path.join(ctx.artifacts, "summary.txt")
    with open(path, "w") as f:
        for p in parts:
            f.write(f"{p['item']}\t{p['value']}\n")
    return {"count": len(values), "sum": sum(values), "report": path}
