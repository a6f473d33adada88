"""Certificates and ACL users for Redis over TLS: what the Compose ``tls`` profile runs once
(the ``redis-setup`` service), what the tests start their TLS Redis with, and what an operator
can run by hand.

    python ops/redis_tls.py certs DIR [HOST ...]   # e.g. certs /tls redis 10.0.0.5 redis.internal
    python ops/redis_tls.py acl FILE        # from REDIS_URL, REDIS_PASSWORD, CARNUMBER_KEY_PREFIX,
                                            # CARNUMBER_QUEUE, REDIS_MONITOR_PASSWORD (optional)

``certs`` writes a private CA (``ca.pem``, ``ca.key``), a server certificate for the given host
names and addresses (``server.pem``, ``server.key``; localhost and 127.0.0.1 always) and a client
certificate (``client.pem``, ``client.key``) for servers that ask for one (``tls-auth-clients``).
Files already there are kept, so running it again changes nothing. Keys are mode 0600.

``acl`` writes a Redis ACL file (``--aclfile``) holding passwords only as SHA-256 hashes:

* ``default``: the administrator (every command), with ``REDIS_PASSWORD``; off without it.
* the user named in ``REDIS_URL`` (``rediss://USER:PASSWORD@...``): the fleet's user — workers,
  producers, every command and Flower — with :func:`fleet_rules`: only the keys of our prefix
  and queue, kombu's and Celery's, only the channels of Celery's events and broadcasts, and no
  administrative or dangerous command (no FLUSHDB, KEYS, CONFIG, DEBUG, SHUTDOWN, ACL, MONITOR).
* ``carnumber-monitor`` when ``REDIS_MONITOR_PASSWORD`` is set: :func:`monitor_rules`, read-only
  commands on the same keys, for ``carnumber metrics``.

The rules are the ones ``tests/test_redis_tls.py`` runs a worker, the producer, ``status`` and
``metrics`` under, with Redis's ACL log empty afterwards. Needs the ``cryptography`` package for
``certs`` (installed with carnumber's ``oss`` and ``test`` extras).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertFiles", "acl_file", "fleet_rules", "main", "monitor_rules", "write_certs"]

MONITOR_USER = "carnumber-monitor"


@dataclass(frozen=True, slots=True)
class CertFiles:
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path

    @classmethod
    def under(cls, directory: Path) -> CertFiles:
        d = Path(directory)
        return cls(
            d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
        )


def write_certs(directory: Path, hosts: Iterable[str] = (), days: int = 825) -> CertFiles:
    """A CA, a server certificate for ``hosts`` (plus localhost and 127.0.0.1) and a client
    certificate under ``directory``; files already there are kept."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise SystemExit("redis_tls.py certs needs cryptography: pip install cryptography") from None

    files = CertFiles.under(directory)
    files.ca.parent.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    def key_for(path: Path) -> ec.EllipticCurvePrivateKey:
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            return loaded
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return key

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca_key = key_for(files.ca_key)
    if not files.ca.exists():
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("carnumber Redis CA"))
            .issuer_name(name("carnumber Redis CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ca_usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())

    def leaf(path: Path, key_path: Path, cn: str, usage: x509.ObjectIdentifier, sans: list[str]) -> None:
        key = key_for(key_path)
        if path.exists():
            return
        alt: list[x509.GeneralName] = []
        for h in dict.fromkeys(sans):
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))

    server_names = [*hosts, "localhost", "127.0.0.1"]
    leaf(files.server, files.server_key, server_names[0], ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    leaf(files.client, files.client_key, "carnumber", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return files


def fleet_rules(prefix: str = "carnumber", queue: str = "carnumber", db: int = 0) -> list[str]:
    """ACL rules for the fleet's user: workers, producers, every carnumber command and Flower.

    Keys: ours (``PREFIX:*``); the queue (``QUEUE`` and the priority lists kombu reads with it,
    ``QUEUE`` + ``\\x06\\x16`` + a digit, written ``QUEUE??[0-9]`` to stay printable); kombu's
    (``_kombu.binding*``, ``unacked``, ``unacked_index``, ``unacked_mutex``); Celery's remote
    control (``*.celery.pidbox*``: each node's mailbox and the reply queues of ``carnumber
    status`` and Flower asking the workers) and event queues (``celeryev.*``). Channels: Celery's
    events and broadcasts, which kombu publishes on ``/DB.celeryev/...`` and ``/DB.celery.pidbox``
    (``DB``: REDIS_URL's database); a subscription by pattern must be allowed word for word, so
    the two patterns Celery subscribes with are listed. Commands: reads, writes, scripts (the
    rate limiter, leases and run bookkeeping are Lua), transactions, pub/sub, the connection's
    own, ``TIME`` (Lua reads Redis's clock) and ``INFO`` (a worker checks Redis's uptime before
    sweeping leases); nothing else administrative or dangerous (no FLUSHDB, KEYS, CONFIG, ACL,
    MONITOR, DEBUG, SHUTDOWN, CLIENT KILL).
    """
    prefix = prefix.rstrip(":")
    keys = [f"~{prefix}:*", f"~{queue}", f"~{queue}??[0-9]", "~_kombu.binding*",
            "~unacked", "~unacked_index", "~unacked_mutex", "~*.celery.pidbox*", "~celeryev.*"]  # fmt: skip
    channels = [f"&/{db}.celeryev/*", f"&/{db}.celeryev/worker.*", f"&/{db}.celery.pidbox"]
    return [
        "resetkeys", *dict.fromkeys(keys), "resetchannels", *channels,
        "-@all", "+@read", "+@write", "+@transaction", "+@pubsub", "+@connection",
        "-@dangerous", "-@admin", *_SCRIPTS, "+info", "+time",
    ]  # fmt: skip


# Running Lua, not managing it (no SCRIPT FLUSH, no FUNCTION): each command a script runs is
# checked against the user's own rules, so a read-only user's scripts can only read.
_SCRIPTS = ["+eval", "+evalsha", "+eval_ro", "+evalsha_ro", "+script|load", "+script|exists"]


def monitor_rules(prefix: str = "carnumber", queue: str = "carnumber") -> list[str]:
    """ACL rules for the metrics exporter (``carnumber metrics``): read-only commands, and
    scripts that can only read, on the fleet's keys."""
    keys = [r for r in fleet_rules(prefix, queue) if r.startswith("~") or r == "resetkeys"]
    return [*keys, "resetchannels", "-@all", "+@read", "+@connection", "-@dangerous", "-@admin",
            *_SCRIPTS, "+info", "+time"]  # fmt: skip


def _user_line(user: str, password: str, rules: list[str]) -> str:
    digest = hashlib.sha256(password.encode()).hexdigest()
    return " ".join(["user", user, "on", f"#{digest}", *rules])


def acl_file(env: Mapping[str, str]) -> str:
    """The ACL file's text for the settings in ``env`` (see the module's docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from workers.redis_connect import parse

    target = parse(env.get("REDIS_URL", ""))
    prefix = env.get("CARNUMBER_KEY_PREFIX") or "carnumber"
    queue = env.get("CARNUMBER_QUEUE") or "carnumber"
    lines = []
    admin = env.get("REDIS_PASSWORD")
    lines.append(_user_line("default", admin, ["~*", "&*", "+@all"]) if admin else "user default off")
    if target.username and target.username != "default":
        if not target.password:
            raise SystemExit("redis_tls.py acl: REDIS_URL names a user but no password")
        lines.append(_user_line(target.username, target.password, fleet_rules(prefix, queue, target.db)))
    monitor = env.get("REDIS_MONITOR_PASSWORD")
    if monitor:
        lines.append(_user_line(MONITOR_USER, monitor, monitor_rules(prefix, queue)))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redis_tls.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    certs = sub.add_parser("certs", help="write a CA, a server and a client certificate")
    certs.add_argument("dir", type=Path)
    certs.add_argument("hosts", nargs="*", help="the server's names and addresses (the first is its CN)")
    certs.add_argument("--days", type=int, default=825)
    acl = sub.add_parser("acl", help="write the ACL file for the settings in the environment")
    acl.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.what == "certs":
        files = write_certs(args.dir, args.hosts, args.days)
        print(f"redis_tls.py: certificates in {files.ca.parent} (CA: {files.ca})")
        return 0
    if not os.environ.get("REDIS_PASSWORD"):
        raise SystemExit("redis_tls.py acl: set REDIS_PASSWORD (the administrator, Redis's default user)")
    text = acl_file(os.environ)
    fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    print(f"redis_tls.py: ACL users written to {args.file} ({text.count(chr(10))} users)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
