"""Loading and validating the agent's one TOML configuration file.

Every value is checked at start. An error names the file, the key (as a TOML path such as
``peers[2].transport.host``), the line where that key or its table starts, and what is
wrong, so an operator can fix it from the journal alone. Relative paths are resolved
against the config file's folder.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.jmix.errors import KeyFormatError
from agent.jmix.keys import (
    _ED25519_PUBLIC,
    _X25519_PUBLIC,
    b64decode,
    normalise_fingerprint,
    parse_key,
    raw_public,
)
from agent.jmix.profiles import PROFILES
from agent.jmix.seal import ENVELOPE_FORMATS
from agent.transport.sftp import parse_host_key

DEFAULT_CONFIG = Path("/etc/jmix-agent/agent.toml")
AE_TITLE = re.compile(r"[\x20-\x7e]{1,16}")
PEER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._@/-]{0,127}")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what to change."""


@dataclass(frozen=True)
class IdentityConfig:
    """Our identity: the id and name peers know us by, and our private key files."""

    id: str
    name: str
    contact: str
    signing_key: Path
    encryption_key: Path
    previous_encryption_keys: tuple[Path, ...] = ()
    requester_id: str | None = None
    """Party named as ``requester`` in every envelope we seal, with an assertion we sign."""
    requester_name: str = ""


@dataclass(frozen=True)
class CallerRule:
    """One allowed calling AE title, optionally tied to a source address or network."""

    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@dataclass(frozen=True)
class DicomConfig:
    """The C-STORE SCP."""

    enabled: bool = False
    ae_title: str = "JMIX_AGENT"
    bind: str = "0.0.0.0"  # noqa: S104 - a DICOM listener serves the hospital network
    port: int = 11112
    allowed_callers: tuple[CallerRule, ...] = ()
    max_associations: int = 10


@dataclass(frozen=True)
class WatchConfig:
    """One drop folder."""

    name: str
    path: Path
    stable_seconds: float = 5.0
    polling: bool = False


@dataclass(frozen=True)
class SftpTransportConfig:
    """Delivery into a peer's inbox over SFTP with a pinned host key."""

    host: str
    port: int
    username: str
    private_key: Path
    host_keys: tuple[str, ...]
    remote_dir: str
    connect_timeout: float = 15.0
    kind: str = "sftp"


@dataclass(frozen=True)
class DirectoryTransportConfig:
    """Delivery into a folder (a mounted share, or a peer on the same host)."""

    path: Path
    kind: str = "directory"


TransportConfig = SftpTransportConfig | DirectoryTransportConfig


@dataclass(frozen=True)
class PeerConfig:
    """A site we exchange envelopes with, and the keys pinned for it."""

    id: str
    name: str
    encryption_key: bytes
    signing_keys: tuple[bytes, ...]
    transport: TransportConfig | None
    profile: str = "spec"
    allow_plain: bool = False
    contact: str = ""
    envelope_format: str = "folder"
    """Envelope form for this peer: ``folder``, or ``zip`` for one file."""
    jws: bool = False
    """Whether envelopes for this peer carry ``manifest.jws``."""
    require_jws: bool = False
    """Whether envelopes from this peer without ``manifest.jws`` are rejected."""

    @property
    def encryption_public_key(self) -> X25519PublicKey:
        """The X25519 key envelopes for this peer are sealed to."""
        return X25519PublicKey.from_public_bytes(self.encryption_key)


@dataclass(frozen=True)
class RouteConfig:
    """A routing rule: the peers that matching studies go to. Empty criteria match all."""

    to: tuple[str, ...]
    calling_ae: tuple[str, ...] = ()
    watch: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()


@dataclass(frozen=True)
class InboundConfig:
    """Receiving: where envelopes arrive, where verified studies go, what is rejected."""

    enabled: bool
    inbox: Path
    import_dir: Path
    quarantine_dir: Path
    settle_seconds: float = 2.0
    stale_upload_seconds: float = 3600.0
    """Age after which an unchanged hidden partial upload in the inbox is deleted."""
    revoked_fingerprints: tuple[str, ...] = ()
    max_envelope_bytes: int = 64 * 1024**3
    """Largest decrypted payload, and largest total of unpacked files, in bytes."""
    max_members: int = 100_000
    max_expansion_ratio: float = 200.0
    """Largest unpacked/packed size ratio of a gzip-compressed payload tar."""
    max_envelope_age_hours: float = 720.0
    max_clock_skew_seconds: float = 300.0
    directory_public_key: bytes | None = None
    """Pinned Ed25519 key of a directory that may vouch for senders not in [[peers]]."""


@dataclass(frozen=True)
class DeliveryConfig:
    """Retry schedule, maximum age and retention of outbound envelopes."""

    retry_initial_seconds: float = 5.0
    retry_max_seconds: float = 900.0
    max_age_hours: float = 72.0
    """Age after which an undelivered envelope moves to failed/<peer>/."""
    paused_retry_seconds: float = 3600.0
    """Pause of a peer after a permanent error (host key, client key)."""
    retention_hours: float = 168.0
    """Time that sealed and sent data is kept after every routed peer has it."""


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    source: Path
    state_dir: Path
    study_quiet_seconds: float
    min_free_mb: int
    identity: IdentityConfig
    dicom: DicomConfig
    watch: tuple[WatchConfig, ...]
    peers: tuple[PeerConfig, ...]
    routes: tuple[RouteConfig, ...]
    inbound: InboundConfig
    audit_path: Path
    log_level: str = "INFO"
    poll_interval: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)

    def peer(self, peer_id: str) -> PeerConfig:
        """Return the peer with this id or raise KeyError."""
        for peer in self.peers:
            if peer.id == peer_id:
                return peer
        raise KeyError(peer_id)


class _Reader:
    """Typed access to one TOML table that reports errors with key path and line."""

    def __init__(self, loader: _Loader, table: Mapping[str, Any], path: str) -> None:
        self._loader = loader
        self._table = table
        self._path = path
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def fail(self, name: str | None, problem: str) -> ConfigError:
        key = self.key(name) if name else self._path
        return self._loader.error(key, problem)

    def get(
        self, name: str, kind: type | tuple[type, ...], default: Any = ..., what: str = ""
    ) -> Any:
        self._used.add(name)
        if name not in self._table:
            if default is ...:
                raise self.fail(name, "is required but missing")
            return default
        value = self._table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (
            isinstance(value, bool)
            and kind is not bool
            and not (isinstance(kind, tuple) and bool in kind)
        ):
            raise self.fail(name, f"must be {what or _type_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise self.fail(name, f"must be {what or _type_name(kind)}, got {type(value).__name__}")
        return value

    def text(self, name: str, default: Any = ..., pattern: re.Pattern[str] | None = None) -> Any:
        value = self.get(name, str, default)
        if isinstance(value, str):
            if pattern is not None and not pattern.fullmatch(value):
                raise self.fail(name, f"has an invalid value {value!r}")
            if not value.strip() and default is ...:
                raise self.fail(name, "must not be empty")
        return value

    def number(
        self, name: str, default: float, minimum: float, maximum: float | None = None
    ) -> float:
        value = float(self.get(name, float, default, "a number"))
        if value < minimum or (maximum is not None and value > maximum):
            bound = (
                f"between {minimum:g} and {maximum:g}"
                if maximum is not None
                else f"at least {minimum:g}"
            )
            raise self.fail(name, f"must be {bound}, got {value:g}")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self.get(name, int, default, "an integer")
        if not minimum <= value <= maximum:
            raise self.fail(name, f"must be between {minimum} and {maximum}, got {value}")
        return int(value)

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name, list, [], "a list of strings")
        if not all(isinstance(item, str) for item in value):
            raise self.fail(name, "must be a list of strings")
        return tuple(value)

    def path(self, name: str, default: Any = ...) -> Any:
        value = self.text(name, default)
        if value is None:
            return None
        return self._loader.resolve(Path(value))

    def table(self, name: str, required: bool = False) -> _Reader | None:
        value = self.get(name, dict, None if not required else ..., "a table")
        if value is None:
            return None
        return _Reader(self._loader, value, self.key(name))

    def tables(self, name: str) -> list[_Reader]:
        value = self.get(name, list, [], "an array of tables ([[...]])")
        readers = []
        for index, item in enumerate(value, start=1):
            if not isinstance(item, dict):
                raise self.fail(name, "must be an array of tables ([[...]])")
            readers.append(_Reader(self._loader, item, f"{self.key(name)}[{index}]"))
        return readers

    def finish(self) -> None:
        unknown = sorted(set(self._table) - self._used)
        if unknown:
            raise self.fail(unknown[0], "is not a known setting (check its spelling and table)")


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    if isinstance(kind, tuple):
        return " or ".join(names.get(item, item.__name__) for item in kind)
    return names.get(kind, kind.__name__)


class _Loader:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def resolve(self, value: Path) -> Path:
        return value if value.is_absolute() else (self.path.parent / value).resolve()

    def line_of(self, key: str) -> int | None:
        """Find the line of a key path such as ``peers[2].transport.host`` (best effort).

        Table headers are searched through the whole file, a plain key only inside its
        own table. A key that is not in the file gives the line of its table's header.
        """
        parts = re.findall(r"([A-Za-z_][A-Za-z0-9_-]*)(?:\[(\d+)\])?", key)
        found_line: int | None = None
        start = 0
        table: list[str] = []
        for depth, (name, index) in enumerate(parts):
            dotted = re.escape(".".join([*table, name]))
            header = re.compile(r"\s*\[\[?\s*" + dotted + r"\s*\]\]?\s*(#.*)?$")
            assign = re.compile(r"\s*" + re.escape(name) + r"\s*=")
            last = depth == len(parts) - 1
            wanted = int(index) if index else 1
            count = 0
            match = None
            for number in range(start, len(self.lines)):
                text = self.lines[number]
                if header.match(text):
                    count += 1
                elif last and assign.match(text):
                    count += 1
                elif number > start and text.lstrip().startswith("[") and not header.match(text):
                    if last and found_line is not None and not self._is_subtable(text, table):
                        break
                    continue
                else:
                    continue
                if count == wanted:
                    match = number
                    break
            if match is None:
                return found_line
            found_line = match + 1
            start = match
            table.append(name)
        return found_line

    @staticmethod
    def _is_subtable(text: str, table: list[str]) -> bool:
        """Return True if a header line opens a table nested in ``table``."""
        prefix = ".".join(table) + "."
        return bool(table) and text.strip().lstrip("[").startswith(prefix)

    def error(self, key: str, problem: str) -> ConfigError:
        line = self.line_of(key) if key else None
        where = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


def _public_key(reader: _Reader, name: str, signing: bool, value: str) -> bytes:
    try:
        if signing:
            return raw_public(parse_key(value, _ED25519_PUBLIC, reader.key(name)))
        return raw_public(parse_key(value, _X25519_PUBLIC, reader.key(name)))
    except KeyFormatError as exc:
        kind = "Ed25519" if signing else "X25519"
        raise reader.fail(name, f"is not a valid {kind} public key: {exc}") from None


def _transport(reader: _Reader | None) -> TransportConfig | None:
    if reader is None:
        return None
    kind = reader.text("kind")
    if kind not in ("sftp", "directory"):
        raise reader.fail("kind", f'must be "sftp" or "directory", got {kind!r}')
    if kind == "directory":
        config: TransportConfig = DirectoryTransportConfig(reader.path("path"))
    else:
        host_keys = reader.get(
            "host_key", (str, list), what="an OpenSSH public key line or a list of them"
        )
        keys = (host_keys,) if isinstance(host_keys, str) else tuple(host_keys)
        for line in keys:
            if not isinstance(line, str) or len(line.split()) < 2:
                raise reader.fail(
                    "host_key",
                    "must be an OpenSSH public key line such as "
                    "'ssh-ed25519 AAAA...' (from the server's /etc/ssh/ssh_host_*_key.pub)",
                )
            try:
                parse_host_key(line)
            except ValueError as exc:
                raise reader.fail(
                    "host_key", f"is not a usable OpenSSH public key: {exc}"
                ) from None
        config = SftpTransportConfig(
            host=reader.text("host"),
            port=reader.integer("port", 22, 1, 65535),
            username=reader.text("username"),
            private_key=reader.path("private_key"),
            host_keys=keys,
            remote_dir=reader.text("remote_dir"),
            connect_timeout=reader.number("connect_timeout", 15.0, 1.0, 600.0),
        )
    reader.finish()
    return config


def _peer(reader: _Reader) -> PeerConfig:
    """Validate one [[peers]] table: its id, pinned keys, dialect and transport."""
    identifier = reader.text("id", pattern=PEER_ID)

    # The pinned keys, from the peer's identity card.
    encryption = _public_key(reader, "encryption_key", False, reader.text("encryption_key"))
    signing_values = reader.get(
        "signing_key", (str, list), what="a base64 public key or a list of them"
    )
    signing_list = [signing_values] if isinstance(signing_values, str) else signing_values
    if not signing_list:
        raise reader.fail("signing_key", "must list at least one key")
    signing = tuple(_public_key(reader, "signing_key", True, value) for value in signing_list)
    if encryption in signing:
        raise reader.fail(
            "encryption_key",
            "is the same key as signing_key; the peer's card lists two different keys, "
            "so one of them was probably pasted into the wrong line",
        )

    # What we write for this peer.
    profile = reader.text("profile", "spec")
    if profile not in PROFILES:
        raise reader.fail("profile", f"must be one of {', '.join(PROFILES)}, got {profile!r}")
    envelope_format = reader.text("envelope_format", "folder")
    if envelope_format not in ENVELOPE_FORMATS:
        raise reader.fail(
            "envelope_format",
            f"must be one of {', '.join(ENVELOPE_FORMATS)}, got {envelope_format!r}",
        )

    peer = PeerConfig(
        id=identifier,
        name=reader.text("name", identifier),
        encryption_key=encryption,
        signing_keys=signing,
        transport=_transport(reader.table("transport")),
        profile=profile,
        allow_plain=reader.get("allow_plain", bool, False),
        contact=reader.text("contact", ""),
        envelope_format=envelope_format,
        jws=reader.get("jws", bool, False),
        require_jws=reader.get("require_jws", bool, False),
    )
    reader.finish()
    return peer


def _callers(reader: _Reader) -> tuple[CallerRule, ...]:
    rules = []
    for entry in reader.strings("allowed_callers"):
        ae, _, address = entry.partition("@")
        if not AE_TITLE.fullmatch(ae.strip()) or not ae.strip():
            raise reader.fail(
                "allowed_callers", f"entry {entry!r} is not an AE title of 1-16 characters"
            )
        network = None
        if address:
            try:
                network = ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise reader.fail(
                    "allowed_callers",
                    f"entry {entry!r}: {address!r} is not an IP address or network",
                ) from None
        rules.append(CallerRule(ae.strip(), network))
    return tuple(rules)


def parse_config(text: str, source: Path) -> Config:
    """Validate the TOML text of a config file; raise ConfigError naming the problem."""
    loader = _Loader(source, text)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    root = _Reader(loader, document, "")

    agent = root.table("agent") or _Reader(loader, {}, "agent")
    state_dir = agent.path("state_dir", "/var/lib/jmix-agent")
    study_quiet = agent.number("study_quiet_seconds", 30.0, 0.0, 86400.0)
    min_free_mb = agent.integer("min_free_mb", 512, 0, 10**9)
    log_level = agent.text("log_level", "INFO", re.compile(r"DEBUG|INFO|WARNING|ERROR"))
    poll = agent.number("poll_interval", 1.0, 0.05, 60.0)
    agent.finish()

    identity_table = root.table("identity", required=True)
    assert identity_table is not None
    identity = IdentityConfig(
        id=identity_table.text("id", pattern=PEER_ID),
        name=identity_table.text("name"),
        contact=identity_table.text("contact", ""),
        signing_key=identity_table.path("signing_key", str(state_dir / "keys" / "signing.key")),
        encryption_key=identity_table.path(
            "encryption_key", str(state_dir / "keys" / "encryption.key")
        ),
        previous_encryption_keys=tuple(
            loader.resolve(Path(item))
            for item in identity_table.strings("previous_encryption_keys")
        ),
        requester_id=identity_table.text("requester_id", None, PEER_ID),
        requester_name=identity_table.text("requester_name", ""),
    )
    identity_table.finish()

    dicom_table = root.table("dicom")
    dicom = DicomConfig()
    if dicom_table is not None:
        dicom = DicomConfig(
            enabled=dicom_table.get("enabled", bool, True),
            ae_title=dicom_table.text("ae_title", "JMIX_AGENT", AE_TITLE),
            bind=dicom_table.text("bind", "0.0.0.0"),  # noqa: S104
            port=dicom_table.integer("port", 11112, 1, 65535),
            allowed_callers=_callers(dicom_table),
            max_associations=dicom_table.integer("max_associations", 10, 1, 1000),
        )
        dicom_table.finish()

    watches = []
    for table in root.tables("watch"):
        path = table.path("path")
        watches.append(
            WatchConfig(
                name=table.text("name", path.name, re.compile(r"[A-Za-z0-9_.-]{1,64}")),
                path=path,
                stable_seconds=table.number("stable_seconds", 5.0, 0.1, 3600.0),
                polling=table.get("polling", bool, False),
            )
        )
        table.finish()

    peers = [_peer(table) for table in root.tables("peers")]
    for index, peer in enumerate(peers, start=1):
        if peer.id == identity.id:
            raise loader.error(
                f"peers[{index}].id",
                f"is our own identity id {peer.id!r}; a peer is another site",
            )
    ids = [peer.id for peer in peers]
    for index, peer_id in enumerate(ids, start=1):
        if ids.index(peer_id) != index - 1:
            raise loader.error(f"peers[{index}].id", f"duplicates peer id {peer_id!r}")

    routes = []
    for table in root.tables("routes"):
        targets = table.strings("to")
        if not targets:
            raise table.fail("to", "must name at least one peer id")
        for target in targets:
            if target not in ids:
                raise table.fail("to", f"names {target!r}, which is not a configured peer id")
        routes.append(
            RouteConfig(
                to=targets,
                calling_ae=table.strings("calling_ae"),
                watch=table.strings("watch"),
                modality=tuple(item.upper() for item in table.strings("modality")),
            )
        )
        table.finish()

    inbound_table = root.table("inbound") or _Reader(loader, {}, "inbound")
    revoked = inbound_table.strings("revoked_fingerprints")
    for value in revoked:
        try:
            normalise_fingerprint(value)
        except KeyFormatError as exc:
            raise inbound_table.fail("revoked_fingerprints", str(exc)) from None
    directory_text = inbound_table.text("directory_public_key", None)
    directory_key = (
        _public_key(inbound_table, "directory_public_key", True, directory_text)
        if directory_text is not None
        else None
    )
    inbound = InboundConfig(
        enabled=inbound_table.get("enabled", bool, True),
        inbox=inbound_table.path("inbox", str(state_dir / "inbox")),
        import_dir=inbound_table.path("import_dir", str(state_dir / "import")),
        quarantine_dir=inbound_table.path("quarantine_dir", str(state_dir / "quarantine")),
        settle_seconds=inbound_table.number("settle_seconds", 2.0, 0.0, 3600.0),
        stale_upload_seconds=inbound_table.number("stale_upload_seconds", 3600.0, 1.0, 10**7),
        revoked_fingerprints=tuple(normalise_fingerprint(value) for value in revoked),
        directory_public_key=directory_key,
        max_envelope_bytes=inbound_table.integer(
            "max_envelope_bytes", 64 * 1024**3, 1024 * 1024, 2**50
        ),
        max_members=inbound_table.integer("max_members", 100_000, 1, 10_000_000),
        max_expansion_ratio=inbound_table.number("max_expansion_ratio", 200.0, 1.0, 1e6),
        max_envelope_age_hours=inbound_table.number("max_envelope_age_hours", 720.0, 1.0, 87600.0),
        max_clock_skew_seconds=inbound_table.number("max_clock_skew_seconds", 300.0, 0.0, 86400.0),
    )
    inbound_table.finish()

    delivery_table = root.table("delivery") or _Reader(loader, {}, "delivery")
    retry_initial = delivery_table.number("retry_initial_seconds", 5.0, 0.1, 86400.0)
    delivery = DeliveryConfig(
        retry_initial_seconds=retry_initial,
        retry_max_seconds=delivery_table.number("retry_max_seconds", 900.0, retry_initial, 86400.0),
        max_age_hours=delivery_table.number("max_age_hours", 72.0, 0.0001, 87600.0),
        paused_retry_seconds=delivery_table.number("paused_retry_seconds", 3600.0, 1.0, 10**7),
        retention_hours=delivery_table.number("retention_hours", 168.0, 0.0, 87600.0),
    )
    delivery_table.finish()

    audit_table = root.table("audit") or _Reader(loader, {}, "audit")
    audit_path = audit_table.path("path", str(state_dir / "audit.jsonl"))
    audit_table.finish()
    root.finish()

    return Config(
        source=source,
        state_dir=state_dir,
        study_quiet_seconds=study_quiet,
        min_free_mb=min_free_mb,
        identity=identity,
        dicom=dicom,
        watch=tuple(watches),
        peers=tuple(peers),
        routes=tuple(routes),
        inbound=inbound,
        audit_path=audit_path,
        log_level=log_level,
        poll_interval=poll,
        delivery=delivery,
    )


def load_config(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found; copy etc/jmix-agent/agent.toml there or pass --config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    return parse_config(text, path)


def decode_public_key(value: str, what: str) -> bytes:
    """Decode a base64 raw public key (32 bytes), raising ConfigError naming ``what``."""
    try:
        raw = b64decode(value, what)
    except KeyFormatError as exc:
        raise ConfigError(str(exc)) from None
    if len(raw) != 32:
        raise ConfigError(f"{what} has {len(raw)} bytes; a public key has 32")
    return raw
