"""The ``jmix-agent`` command.

Exit status: 0 when the command fully succeeded (for ``open`` and ``verify``: every check
passed), 1 when verification or the operation failed, 2 for usage and configuration
errors. Errors go to stderr as ``jmix-agent: error: ...`` with a hint line where one
helps; results go to stdout (``--json`` for scripts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agent import fsutil
from agent.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from agent.identity import KeyFileError, card_toml, generate_keys, load_identity
from agent.jmix import keys
from agent.jmix.assertion import TrustedKeys
from agent.jmix.container import peek_container
from agent.jmix.errors import JmixError
from agent.jmix.manifest import normalise_manifest
from agent.jmix.profiles import PROFILES, get_profile
from agent.jmix.reader import (
    MAX_MANIFEST_BYTES,
    EnvelopeRejected,
    OpenPolicy,
    find_package_root,
    open_envelope,
)
from agent.jmix.seal import ENVELOPE_FORMATS, Party, PayloadFile, Requester, seal_envelope

PROG = "jmix-agent"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_K = TypeVar("_K")


class UsageError(Exception):
    """Wrong arguments or configuration: exit status 2."""


class Failure(Exception):
    """The operation ran and failed: exit status 1."""


def _error(message: str, hint: str | None = None) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if hint:
        print(f"{PROG}: hint: {hint}", file=sys.stderr)


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("JMIX_AGENT_CONFIG") or DEFAULT_CONFIG)


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(_config_path(args))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _setup_logging(level: str, verbose: int) -> None:
    chosen = logging.DEBUG if verbose else getattr(logging, level, logging.INFO)
    # Under systemd the journal adds its own timestamps.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt))
    package = logging.getLogger("agent")
    package.handlers[:] = [handler]
    package.setLevel(chosen)
    # pydicom reports odd values as UserWarnings whose text can hold UIDs, file paths or
    # patient attributes; the agent's own checks report what matters without values.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
    # pynetdicom logs identifiers from datasets at INFO; keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.WARNING)


# -- run, keygen, identity, check-config ------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_logging(config.log_level, args.verbose)
    from agent.daemon import run_daemon

    try:
        return run_daemon(config)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.signing_key and args.encryption_key:
        signing, encryption = Path(args.signing_key), Path(args.encryption_key)
    else:
        config = _load(args)
        signing, encryption = config.identity.signing_key, config.identity.encryption_key
    try:
        generate_keys(signing, encryption, overwrite=args.force)
    except FileExistsError as exc:
        raise Failure(str(exc)) from None
    print(f"wrote signing key {signing} and encryption key {encryption} (mode 0600)")
    print(f"share the public card with peers: {PROG} identity")
    return EXIT_OK


def cmd_identity(args: argparse.Namespace) -> int:
    config = _load(args)
    try:
        card = load_identity(config.identity).card()
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        print(f"# peer card of {card['name']}; paste into the other site's agent.toml")
        print(card_toml(card), end="")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.config import SftpTransportConfig
    from agent.transport.base import TransportError
    from agent.transport.sftp import load_private_key

    config = _load(args)
    try:
        load_identity(config.identity)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    for peer in config.peers:
        if isinstance(peer.transport, SftpTransportConfig):
            try:
                load_private_key(peer.transport.private_key)
            except TransportError as exc:
                raise UsageError(f"{config.source}: peer {peer.id!r}: {exc}") from None
    print(
        f"{config.source}: ok ({_plural(len(config.peers), 'peer')}, "
        f"{_plural(len(config.routes), 'route')}, "
        f"{_plural(len(config.watch), 'drop folder')}, "
        f"DICOM {'on' if config.dicom.enabled else 'off'})"
    )
    # Fingerprints to compare with the '# SHA256:' lines of each peer's identity card.
    for peer in config.peers:
        print(f"peer {peer.id}: encryption key {keys.fingerprint(peer.encryption_key)}")
        for signing in peer.signing_keys:
            print(f"peer {peer.id}: signing key {keys.fingerprint(signing)}")
    return EXIT_OK


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# -- envelopes by hand ---------------------------------------------------------------------


def _key_arg(value: str, loader: Callable[[str, str], _K], what: str) -> _K:
    try:
        return loader(value, what)
    except JmixError as exc:
        raise UsageError(exc.message) from None


def cmd_seal(args: argparse.Namespace) -> int:
    from agent.dicom.inspect import InvalidInstanceError, build_metadata, read_instance_info

    source = Path(args.directory)
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder of DICOM files")
    profile = get_profile(args.profile) if args.profile else None
    envelope_format: str | None = args.format
    with_jws: bool = args.jws
    requester: Requester | None = None
    if args.recipient:
        recipient = _key_arg(args.recipient, keys.load_encryption_public, "recipient key")
        if not args.signing_key:
            raise UsageError("--recipient needs --signing-key (our Ed25519 private key)")
        signing = _key_arg(args.signing_key, keys.load_signing_private, "signing key")
        sender = Party(args.sender_id, args.sender_name or args.sender_id)
        receiver = Party(args.receiver_id, args.receiver_id)
    elif args.to:
        config = _load(args)
        try:
            identity = load_identity(config.identity)
            peer = config.peer(args.to)
        except KeyFileError as exc:
            raise UsageError(str(exc)) from None
        except KeyError:
            raise UsageError(
                f"no peer with id {args.to!r} in {config.source}",
            ) from None
        recipient, signing = peer.encryption_public_key, identity.signing_key
        sender = Party(identity.id, identity.name, identity.contact)
        receiver = Party(peer.id, peer.name, peer.contact)
        profile = profile or get_profile(peer.profile)
        envelope_format = envelope_format or peer.envelope_format
        with_jws = with_jws or peer.jws
        if config.identity.requester_id:
            requester_name = config.identity.requester_name or config.identity.requester_id
            requester = Requester(Party(config.identity.requester_id, requester_name), signing)
    else:
        raise UsageError("give --to PEER (with a config) or --recipient KEY --signing-key KEY")

    files: list[PayloadFile] = []
    seen: set[str] = set()
    for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            info = read_instance_info(path)
        except InvalidInstanceError as exc:
            print(f"{PROG}: warning: skipping {path}: {exc}", file=sys.stderr)
            continue
        if info.sop_instance_uid in seen:
            print(f"{PROG}: warning: skipping {path}: duplicate SOP instance", file=sys.stderr)
            continue
        seen.add(info.sop_instance_uid)
        files.append(PayloadFile(f"dicom/{info.sop_instance_uid}.dcm", path))
    if not files:
        raise Failure(f"no DICOM files found in {source}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    try:
        metadata = build_metadata([item.path for item in files])
    except ValueError as exc:
        raise Failure(f"{source}: {exc}") from None
    result = seal_envelope(
        files,
        metadata,
        output,
        sender,
        signing,
        receiver,
        recipient,
        profile=profile or get_profile("spec"),
        envelope_format=envelope_format or "folder",
        jws=with_jws,
        requester=requester,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "envelope": str(result.path),
                    "id": result.envelope_id,
                    "files": result.files,
                    "payload_hash": result.payload_hash,
                }
            )
        )
    else:
        print(f"sealed {result.files} instances into {result.path}")
    return EXIT_OK


def _open_policy(args: argparse.Namespace) -> OpenPolicy:
    if args.key:
        recipient_keys = tuple(
            _key_arg(k, keys.load_encryption_private, "decryption key") for k in args.key
        )
        trusted: dict[str, list[bytes]] = {}
        pinned = [
            keys.raw_public(_key_arg(t, keys.load_signing_public, "trusted signing key"))
            for t in args.trust or []
        ]
        policy_trust = TrustedKeys(_AnyEntity(pinned) if pinned else trusted)
        directory = [
            keys.raw_public(_key_arg(d, keys.load_signing_public, "directory key"))
            for d in args.directory_key or []
        ]
        return OpenPolicy(
            recipient_keys=recipient_keys,
            trusted=policy_trust,
            require_sender_identity=not args.allow_untrusted_sender,
            allow_plain=True,
            require_name_match=False,
            require_jws=args.require_jws,
            directory_keys=tuple(directory),
        )
    config = _load(args)
    try:
        identity = load_identity(config.identity)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    return OpenPolicy(
        recipient_keys=identity.encryption_keys,
        trusted=TrustedKeys(
            {peer.id: tuple(peer.signing_keys) for peer in config.peers},
            frozenset(config.inbound.revoked_fingerprints),
        ),
        our_id=identity.id,
        require_sender_identity=not args.allow_untrusted_sender,
        allow_plain=True,
        require_name_match=False,
        require_jws=args.require_jws,
        require_jws_senders=frozenset(peer.id for peer in config.peers if peer.require_jws),
        directory_keys=(
            (config.inbound.directory_public_key,) if config.inbound.directory_public_key else ()
        ),
    )


class _AnyEntity(dict[str, Sequence[bytes]]):
    """Pins the ``--trust`` keys for whatever sender id the envelope names."""

    def __init__(self, pinned: list[bytes]) -> None:
        super().__init__()
        self._pinned = tuple(pinned)

    def get(self, _key: str, _default: Any = None) -> Sequence[bytes]:
        return self._pinned


def _run_open(args: argparse.Namespace, keep: Path | None) -> int:
    if keep is not None and keep.exists() and any(keep.iterdir()):
        raise UsageError(f"output folder {keep} is not empty; choose a new one")
    policy = _open_policy(args)
    envelope = Path(args.envelope)
    if not envelope.exists() and not envelope.is_symlink():
        raise UsageError(f"{envelope}: no such envelope folder or file")
    with tempfile.TemporaryDirectory(prefix="jmix-open-") as work:
        try:
            opened = open_envelope(envelope, policy, Path(work))
        except EnvelopeRejected as exc:
            _report_checks(args, exc.checks, envelope, ok=False, code=exc.code)
            return EXIT_FAILED
        unverified = opened.sender is None
        if unverified:
            print(f"{PROG}: warning: the sender of {envelope} is NOT verified", file=sys.stderr)
        write = keep is not None and (not unverified or args.allow_untrusted_sender)
        if write and keep is not None:
            _write_output(opened.payload_dir, keep)
        _report_checks(
            args,
            opened.checks,
            envelope,
            ok=not unverified,
            extra={
                "envelope_id": opened.envelope_id,
                "sender": opened.sender_id,
                "sender_verified": not unverified,
                "hkdf_dialect": opened.hkdf_dialect,
                "hash_rule": opened.hash_rule,
                "container": opened.container,
                "jws_key": opened.jws_key,
                "verified_parties": [
                    {"role": party.role, "id": party.entity_id, "key": party.fingerprint}
                    for party in opened.parties
                ],
                "files": opened.files,
                "output": str(keep) if write else None,
            },
        )
        if unverified and not args.allow_untrusted_sender:
            return EXIT_FAILED
    return EXIT_OK


def _write_output(payload: Path, keep: Path) -> None:
    """Move the verified payload to ``keep`` (a new or empty folder) in one rename."""
    if keep.exists() and any(keep.iterdir()):
        raise UsageError(f"output folder {keep} is not empty; choose a new one")
    keep.parent.mkdir(parents=True, exist_ok=True)
    if keep.exists():
        keep.rmdir()
    fsutil.fsync_tree(payload)
    if _same_fs(payload, keep):
        fsutil.rename_durably(payload, keep)
    else:
        _copy_tree(payload, keep)


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b.parent).st_dev


def _copy_tree(source: Path, target: Path) -> None:
    import shutil

    temporary = fsutil.temp_name(target)
    shutil.copytree(source, temporary)
    fsutil.fsync_tree(temporary)
    fsutil.rename_durably(temporary, target)


def _report_checks(
    args: argparse.Namespace,
    checks: Sequence[Any],
    envelope: Path,
    ok: bool,
    code: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    if args.json:
        document = {
            "envelope": str(envelope),
            "ok": ok,
            "error": code,
            "checks": [check.__dict__ for check in checks],
            **(extra or {}),
        }
        print(json.dumps(document, indent=2))
        return
    for check in checks:
        label = "PASS" if check.ok else "FAIL"
        if check.ok and check.detail.startswith("not checked"):
            label = "SKIP"
        print(f"{label} {check.name}: {check.detail}")
    if not ok and code:
        _error(
            f"{envelope}: verification failed ({code}); later checks were not run",
            _failure_hint(args, code),
        )
    if extra and extra.get("output"):
        print(f"payload written to {extra['output']}")


def _failure_hint(args: argparse.Namespace, code: str) -> str:
    """Return the next step for a failed check, for the by-hand commands."""
    by_hand = bool(getattr(args, "key", None))
    if code == "key_not_pinned" and by_hand:
        return (
            "pass --trust with the sender's signing key (the signing_key line of its "
            "`jmix-agent identity` card), or --allow-untrusted-sender to open it anyway"
        )
    if code == "key_not_pinned":
        return "add the sender's signing key to its [[peers]] signing_key if it really rotated"
    if code in ("decrypt_failed", "no_key"):
        return (
            "check that --key is our X25519 private key and that the envelope was sealed to "
            "its public key"
            if by_hand
            else "the envelope was altered, or sealed to a key that is not ours"
        )
    if code.startswith("jws"):
        return "the manifest.jws does not match; ask the sender to seal the envelope again"
    return "keep the envelope for inspection and ask the sender to seal and send it again"


def cmd_open(args: argparse.Namespace) -> int:
    return _run_open(args, Path(args.output))


def cmd_verify(args: argparse.Namespace) -> int:
    return _run_open(args, None)


def cmd_inspect(args: argparse.Namespace) -> int:
    envelope = Path(args.envelope)
    try:
        if envelope.is_file() and not envelope.is_symlink():
            # A container is read in place, because inspect needs no key and writes nothing.
            listing = peek_container(envelope, MAX_MANIFEST_BYTES)
            raw, names = listing.manifest, listing.root_names
        else:
            root = find_package_root(envelope)
            raw = (root / "manifest.json").read_bytes()
            names = sorted(path.name for path in root.iterdir())
        manifest = normalise_manifest(json.loads(raw))
    except (OSError, ValueError, JmixError) as exc:
        raise Failure(f"{args.envelope}: cannot read manifest.json: {exc}") from None
    security = manifest.get("security") or {}
    summary = {
        "id": manifest.get("id"),
        "version": manifest.get("version"),
        "timestamp": manifest.get("timestamp"),
        "sender": (manifest.get("sender") or {}).get("id"),
        "receivers": [r.get("id") for r in manifest.get("receiver") or [] if isinstance(r, dict)],
        "classification": security.get("classification"),
        "payload_hash": security.get("payload_hash"),
        "encrypted": "encryption" in security,
        "sender_assertion": "assertion" in (manifest.get("sender") or {}),
        "requester": (manifest.get("requester") or {}).get("id"),
        "jws": (security.get("jws") or {}).get("jws_file")
        or ("manifest.jws" if "manifest.jws" in names else None),
        "files": names,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from agent.audit import head_path, verify_log

    path = Path(args.path) if args.path else _load(args).audit_path
    if not path.exists():
        raise UsageError(f"audit log {path} not found")
    report = verify_log(path)
    if report.ok:
        print(f"{path}: {report.records} records, chain intact")
        if report.records and not head_path(path).exists():
            print(
                f"{PROG}: warning: {head_path(path).name} is missing, so records cut off the "
                "end of the log cannot be detected; copy it together with the log",
                file=sys.stderr,
            )
        return EXIT_OK
    # A changed record breaks the link stored in the record after it, so the record
    # before the reported line is suspect too.
    last_intact = (report.first_bad_line or 1) - 2
    _error(
        f"{path}: line {report.first_bad_line}: {report.problem}",
        f"records 1 to {last_intact} are intact" if last_intact > 0 else None,
    )
    return EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from agent.pipeline.status import collect_status, format_status

    config = _load(args)
    if not config.state_dir.is_dir():
        raise UsageError(f"state folder {config.state_dir} does not exist; has the agent run?")
    try:
        status = collect_status(config)
    except PermissionError as exc:
        raise UsageError(
            f"cannot read {exc.filename}: permission denied; run this as the service user "
            "(sudo -u jmix-agent jmix-agent status) or as root"
        ) from None
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status), end="")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    import time
    import uuid

    from agent.pipeline.delivery import retry_envelopes, safe_dir_name

    chosen = [bool(args.envelope_id), bool(args.peer), bool(args.all)]
    if sum(chosen) != 1:
        raise UsageError("give exactly one of ENVELOPE_ID, --peer ID or --all")
    config = _load(args)
    state = config.state_dir
    if not state.is_dir():
        raise UsageError(f"state folder {state} does not exist; has the agent run?")
    if os.geteuid() != state.stat().st_uid:
        # Files this command writes must stay readable and movable by the daemon.
        raise UsageError(
            f"run this as the owner of {state} (uid {state.stat().st_uid}), "
            "for example: sudo -u jmix-agent jmix-agent retry ..."
        )
    envelope_id = None
    if args.envelope_id:
        try:
            envelope_id = str(uuid.UUID(args.envelope_id))
        except ValueError:
            raise UsageError(f"{args.envelope_id!r} is not an envelope id (a UUID)") from None
    peer_dir = safe_dir_name(args.peer) if args.peer else None
    if peer_dir and args.peer not in {peer.id for peer in config.peers}:
        if not any((state / where / peer_dir).is_dir() for where in ("outbox", "failed")):
            raise Failure(f"no peer {args.peer!r} in {config.source} and nothing queued for it")

    outcome = retry_envelopes(state, envelope_id=envelope_id, peer_dir=peer_dir, now=time.time())
    if envelope_id and not outcome.requeued and not outcome.waiting:
        raise Failure(f"no failed or queued envelope {envelope_id}; `{PROG} status` lists them")
    if args.json:
        document = {
            "requeued": [{"peer": peer, "envelope": name} for peer, name in outcome.requeued],
            "queued": [{"peer": peer, "envelope": name} for peer, name in outcome.waiting],
            "peers": outcome.peers,
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    for peer, name in outcome.requeued:
        print(f"moved {name} for {peer} from failed/ back to the outbox")
    if outcome.peers:
        print(
            f"asked the sender of {', '.join(outcome.peers)} to retry now "
            f"({len(outcome.waiting)} envelopes were already queued); a running agent "
            "picks this up within its poll interval, a stopped one when it starts"
        )
    else:
        print("nothing to retry")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    _setup_logging("WARNING", 0)
    result: int = run_demo(Path(args.workdir) if args.workdir else None, keep=args.keep)
    return result


# -- argument parsing ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Seal DICOM studies into JMIX envelopes and exchange them with peers.",
    )
    parser.add_argument(
        "-c", "--config", help=f"config file (default: $JMIX_AGENT_CONFIG or {DEFAULT_CONFIG})"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.set_defaults(func=cmd_run)

    keygen = commands.add_parser("keygen", help="create the signing and encryption keys")
    keygen.add_argument("--signing-key", help="path for the Ed25519 key (default: from config)")
    keygen.add_argument("--encryption-key", help="path for the X25519 key (default: from config)")
    keygen.add_argument("--force", action="store_true", help="replace existing keys")
    keygen.set_defaults(func=cmd_keygen)

    identity = commands.add_parser("identity", help="print our public peer card")
    identity.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    identity.set_defaults(func=cmd_identity)

    check = commands.add_parser("check-config", help="validate the config and keys")
    check.set_defaults(func=cmd_check_config)

    seal = commands.add_parser("seal", help="seal a folder of DICOM files into an envelope")
    seal.add_argument("directory")
    seal.add_argument("-o", "--output", required=True, help="folder to write the envelope into")
    seal.add_argument("--to", help="peer id from the config")
    seal.add_argument("--recipient", help="recipient X25519 public key (file or base64), no config")
    seal.add_argument("--signing-key", help="our Ed25519 private key (file or base64), no config")
    seal.add_argument("--sender-id", default="local", help="sender id without config")
    seal.add_argument("--sender-name", help="sender name without config")
    seal.add_argument("--receiver-id", default="recipient", help="receiver id without config")
    seal.add_argument("--profile", choices=sorted(PROFILES), help="envelope dialect")
    seal.add_argument(
        "--format",
        choices=ENVELOPE_FORMATS,
        help="write a folder or one .zip file (default: the peer's envelope_format, or folder)",
    )
    seal.add_argument(
        "--jws", action="store_true", help="also write manifest.jws (EdDSA over manifest.json)"
    )
    seal.add_argument("--json", action="store_true")
    seal.set_defaults(func=cmd_seal)

    for name, func, helptext in (
        ("open", cmd_open, "verify an envelope and write its payload"),
        ("verify", cmd_verify, "run every check on an envelope, write nothing"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("envelope")
        if name == "open":
            sub.add_argument("-o", "--output", required=True, help="new folder for the payload")
        sub.add_argument(
            "--key", action="append", help="our X25519 private key (file or base64), no config"
        )
        sub.add_argument("--trust", action="append", help="sender Ed25519 public key to trust")
        sub.add_argument(
            "--directory-key",
            action="append",
            help="directory Ed25519 public key whose attestations make a sender trusted",
        )
        sub.add_argument(
            "--require-jws", action="store_true", help="fail when the envelope has no manifest.jws"
        )
        sub.add_argument(
            "--allow-untrusted-sender",
            action="store_true",
            help="UNSAFE: accept a sender whose identity cannot be verified",
        )
        sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=func)

    inspect = commands.add_parser(
        "inspect", help="summarise an envelope's manifest (no key needed)"
    )
    inspect.add_argument("envelope")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    audit_verify = audit_commands.add_parser("verify", help="check the audit log's hash chain")
    audit_verify.add_argument("path", nargs="?", help="audit log (default: from config)")
    audit_verify.set_defaults(func=cmd_audit_verify)

    status = commands.add_parser(
        "status", help="show counts per state and per peer, and what is stuck"
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(func=cmd_status)

    retry = commands.add_parser(
        "retry", help="send failed envelopes again, or end a peer's backoff or pause"
    )
    retry.add_argument("envelope_id", nargs="?", metavar="ENVELOPE_ID", help="one envelope")
    retry.add_argument("--peer", metavar="ID", help="every failed or queued envelope of a peer")
    retry.add_argument("--all", action="store_true", help="every failed or queued envelope")
    retry.add_argument("--json", action="store_true", help="print JSON for scripts")
    retry.set_defaults(func=cmd_retry)

    demo = commands.add_parser("demo", help="send a real study between two local agents")
    demo.add_argument("--workdir", help="folder for the demo (default: a new temporary one)")
    demo.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except Failure as exc:
        _error(str(exc))
        return EXIT_FAILED
    except JmixError as exc:
        _error(exc.message)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
