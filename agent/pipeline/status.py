"""The report of ``jmix-agent status``: counts per state and per peer, and what is stuck.

Everything is read from the state folder, so the command works whether the daemon runs
or not, and never changes anything. An item is listed as stuck when an operator may have
to act. That is an envelope in ``failed/``, an envelope whose delivery failed at least
once, and a batch waiting in ``ready/`` for longer than STUCK_SECONDS (sealing keeps
failing). It is also an inbound envelope claimed for longer than STUCK_SECONDS, which is
an import that failed with an I/O error and waits for the next attempt.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.pipeline.delivery import (
    ENVELOPE_SUFFIXES,
    DeliveryStore,
    EnvelopeRecord,
    envelope_id_of,
    safe_dir_name,
)
from agent.pipeline.outbound import BATCH_FILE, PLAN_FILE
from agent.pipeline.reconcile import CLAIM_PREFIX
from agent.transport.base import PARTIAL_MARKER

STUCK_SECONDS = 600.0
"""Age after which a batch still in ready/ or an inbound claim counts as stuck."""


def _visible(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def _envelopes(directory: Path) -> list[Path]:
    return [p for p in _visible(directory) if p.suffix in ENVELOPE_SUFFIXES]


def _age(path: Path, now: float) -> float:
    try:
        return max(0.0, now - path.lstat().st_mtime)
    except FileNotFoundError:
        return 0.0


def _intake(state: Path, now: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    studies = _visible(state / "incoming")
    instances = sum(1 for study in studies for p in _visible(study) if p.name.endswith(".dcm"))
    ready = [p for p in _visible(state / "ready") if p.is_dir()]
    sealed = [p for p in _visible(state / "sealed") if p.is_dir()]
    unrouted = 0
    for batch in sealed:
        try:
            if not json.loads((batch / PLAN_FILE).read_bytes()).get("peers"):
                unrouted += 1
        except (OSError, ValueError):
            continue
    stuck = []
    for batch in ready:
        age = _age(batch / BATCH_FILE, now)
        if age >= STUCK_SECONDS:
            stuck.append(
                {
                    "kind": "batch",
                    "id": batch.name,
                    "peer": None,
                    "state": "ready",
                    "age_seconds": round(age),
                    "attempts": None,
                    "last_error": "sealing has not succeeded; the agent's log has the error",
                }
            )
    counts = {
        "incoming_studies": len(studies),
        "incoming_instances": instances,
        "ready_batches": len(ready),
        "sealed_batches": len(sealed),
        "unrouted_batches": unrouted,
    }
    return counts, stuck


def _peer_status(
    config: Config, store: DeliveryStore, folder: str, now: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    state = config.state_dir
    names = {safe_dir_name(peer.id): peer.id for peer in config.peers}
    peer_id = names.get(folder, folder)
    gate = store.load_peer(folder)
    queued = _envelopes(state / "outbox" / folder)
    failed = _envelopes(state / "failed" / folder)
    sent = _envelopes(state / "sent" / folder)

    if gate.paused(now):
        condition = "paused"
    elif gate.failures:
        # The last attempt failed; the next one is due now or after the backoff.
        condition = "retrying"
    else:
        condition = "ok"
    summary: dict[str, Any] = {
        "peer": peer_id,
        "configured": folder in names,
        "state": condition,
        "queued": len(queued),
        "failed": len(failed),
        "sent": len(sent),
        "oldest_queued_age_seconds": round(max((_age(p, now) for p in queued), default=0)),
        "consecutive_failures": gate.failures,
        "next_attempt_in_seconds": round(max(0.0, gate.next_attempt - now))
        if condition != "ok"
        else None,
        "last_error": gate.last_error if condition != "ok" else None,
        "paused_since": gate.paused_since if condition == "paused" else None,
        "paused_reason": gate.paused_reason if condition == "paused" else None,
    }

    stuck = []
    for item, where in [*((p, "failed") for p in failed), *((p, "outbox") for p in queued)]:
        record: EnvelopeRecord | None = store.load_record(folder, item.name)
        if where == "outbox" and (record is None or record.attempts == 0):
            continue
        queued_at = record.queued_at if record else now - _age(item, now)
        stuck.append(
            {
                "kind": "envelope",
                "id": envelope_id_of(item.name),
                "peer": peer_id,
                "state": "failed" if where == "failed" else condition.replace("ok", "queued"),
                "age_seconds": round(max(0.0, now - queued_at)),
                "attempts": record.attempts if record else 0,
                "last_error": (record.reason or record.last_error) if record else None,
            }
        )
    return summary, stuck


def _inbound(config: Config, now: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    inbound = config.inbound
    inbox = inbound.inbox
    hidden = [p for p in inbox.iterdir()] if inbox.is_dir() else []
    partial = [p for p in hidden if p.name.startswith(".") and PARTIAL_MARKER in p.name]
    claims = sorted((config.state_dir / "work").glob(f"{CLAIM_PREFIX}*"))
    stuck = []
    for claim in claims:
        age = _age(claim, now)
        if age >= STUCK_SECONDS:
            entries = [p.name for p in claim.iterdir() if p.name != "open"]
            stuck.append(
                {
                    "kind": "inbound",
                    "id": entries[0] if entries else claim.name,
                    "peer": None,
                    "state": "importing",
                    "age_seconds": round(age),
                    "attempts": None,
                    "last_error": "importing has not succeeded; the agent's log has the error",
                }
            )
    counts = {
        "enabled": inbound.enabled,
        "inbox": len(_visible(inbox)),
        "partial_uploads": len(partial),
        "importing": len(claims),
        "imported": len(_visible(inbound.import_dir)),
        "quarantined": len(_visible(inbound.quarantine_dir)),
    }
    return counts, stuck


def collect_status(config: Config, now: float | None = None) -> dict[str, Any]:
    """Return the status document that ``jmix-agent status --json`` prints."""
    current = time.time() if now is None else now
    state = config.state_dir
    store = DeliveryStore(state)
    free = None
    if state.is_dir():
        stats = os.statvfs(state)
        free = stats.f_bavail * stats.f_frsize
    threshold = config.min_free_mb * 1024 * 1024

    intake, stuck = _intake(state, current)
    folders = {safe_dir_name(peer.id) for peer in config.peers if peer.transport is not None}
    for where in ("outbox", "failed", "sent"):
        folders.update(p.name for p in _visible(state / where) if p.is_dir())
    peers = []
    for folder in sorted(folders):
        summary, peer_stuck = _peer_status(config, store, folder, current)
        peers.append(summary)
        stuck += peer_stuck
    inbound, inbound_stuck = _inbound(config, current)
    stuck += inbound_stuck
    return {
        "state_dir": str(state),
        "free_bytes": free,
        "min_free_bytes": threshold,
        "intake_refused": bool(threshold) and free is not None and free < threshold,
        "intake": intake,
        "peers": peers,
        "inbound": inbound,
        "stuck": sorted(stuck, key=lambda item: -item["age_seconds"]),
    }


def format_duration(seconds: float) -> str:
    """Return a short duration such as ``45 s``, ``12 min``, ``3 h 5 min`` or ``2 d 4 h``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _mib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 2**20:.0f} MiB"


def format_status(status: dict[str, Any]) -> str:
    """Return the status document as text for a terminal."""
    intake = status["intake"]
    guard = "REFUSING INTAKE" if status["intake_refused"] else "ok"
    lines = [
        f"state {status['state_dir']}: {_mib(status['free_bytes'])} free, "
        f"min_free_mb {_mib(status['min_free_bytes'])} ({guard})",
        f"intake: {intake['incoming_studies']} studies receiving "
        f"({intake['incoming_instances']} instances), {intake['ready_batches']} batches "
        f"waiting to be sealed, {intake['sealed_batches']} sealed "
        f"({intake['unrouted_batches']} matched no route)",
    ]

    for peer in status["peers"]:
        line = (
            f"peer {peer['peer']}: {peer['queued']} queued, {peer['failed']} failed, "
            f"{peer['sent']} sent"
        )
        if not peer["configured"]:
            line += " (not in the config any more)"
        if peer["state"] == "paused":
            line += (
                f"; PAUSED, next attempt in "
                f"{format_duration(peer['next_attempt_in_seconds'])}: {peer['paused_reason']}"
            )
        elif peer["state"] == "retrying":
            line += (
                f"; retrying in {format_duration(peer['next_attempt_in_seconds'])} after "
                f"{peer['consecutive_failures']} failures: {peer['last_error']}"
            )
        lines.append(line)

    inbound = status["inbound"]
    if inbound["enabled"]:
        lines.append(
            f"inbound: {inbound['inbox']} in the inbox, {inbound['partial_uploads']} partial "
            f"uploads, {inbound['importing']} being imported, {inbound['imported']} imported, "
            f"{inbound['quarantined']} quarantined"
        )

    stuck = status["stuck"]
    if not stuck:
        lines.append("nothing is stuck")
        return "\n".join(lines) + "\n"
    lines.append(f"stuck ({len(stuck)}):")
    for item in stuck:
        attempts = "" if item["attempts"] is None else f", {item['attempts']} attempts"
        peer = f" for {item['peer']}" if item["peer"] else ""
        lines.append(
            f"  {item['kind']} {item['id']}{peer}: {item['state']}, "
            f"age {format_duration(item['age_seconds'])}{attempts}: {item['last_error']}"
        )
    if any(item["kind"] == "envelope" for item in stuck):
        lines.append(
            "fix the cause, then run: jmix-agent retry ENVELOPE_ID (or --peer ID, or --all)"
        )
    return "\n".join(lines) + "\n"
