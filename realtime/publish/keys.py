"""`cemd keys`: CURVE key pairs for the monitor (server) and its clients.

Keys are ZeroMQ certificate files (``NAME.key`` public, ``NAME.key_secret`` secret) so
they load with ``zmq.auth.load_certificate`` and the allow-folder format the ZAP
authenticator reads. A secret is never overwritten: replacing a key silently would
lock out every peer that trusts the old one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import zmq.auth
from rich.console import Console

from engine.errors import CemdError


def generate_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``out_dir/name.key`` and ``out_dir/name.key_secret`` (mode 0600); return their paths."""
    if not name or name != Path(name).name or name.startswith("."):
        raise CemdError(f"key name {name!r} must be a plain file name such as 'monitor' or 'nurse-station'")
    out_dir = Path(out_dir)
    public, secret = out_dir / f"{name}.key", out_dir / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing:
        raise CemdError(
            f"{' and '.join(existing)} already exist; refusing to overwrite a key that peers may trust. "
            "Choose another --name, or delete the old files first if you really mean to replace them"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Written first into a private (0700) folder so the secret is never readable by others,
        # then linked into place: link() fails instead of overwriting a file made meanwhile.
        staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=out_dir))
        try:
            made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(staging, name))
            os.chmod(made_secret, 0o600)
            os.chmod(made_public, 0o644)
            os.link(made_secret, secret)
            try:
                os.link(made_public, public)
            except OSError:
                secret.unlink()
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except FileExistsError:
        raise CemdError(f"{public} or {secret} appeared while writing; refusing to overwrite it") from None
    except OSError as exc:
        raise CemdError(f"cannot write keys into {out_dir}: {exc.strerror or exc}; choose a writable --out") from None
    return public, secret


def load_keypair(path: Path, role: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file; CemdError naming the file if unusable."""
    public, secret = _load(path, role)
    if secret is None:
        raise CemdError(
            f"{role} key file {path} holds only a public key; pass the NAME.key_secret file "
            "written by `cemd keys --out DIR --name NAME`"
        )
    return public, secret


def load_public_key(path: Path, role: str) -> bytes:
    """The Z85 public key in a ``.key`` (or ``.key_secret``) file; CemdError naming the file if unusable."""
    return _load(path, role)[0]


def _load(path: Path, role: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        reason = "it does not exist" if not Path(path).exists() else str(exc)
        raise CemdError(
            f"cannot use {role} key file {path}: {reason}; make a key pair with "
            "`cemd keys --out DIR --name NAME`"
        ) from None


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cemd keys`` to the command line."""
    p = sub.add_parser(
        "keys",
        help="make a CURVE key pair for the monitor or for a client",
        description="Generate a CURVE key pair (ZeroMQ certificate files) for encrypted, authenticated "
                    "alert streaming. Run it once for the monitor and once per client.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write NAME.key and NAME.key_secret into")
    p.add_argument("--name", required=True, help="key name, e.g. monitor or nurse-station")
    p.set_defaults(func=_run_keys)


def _run_keys(args: argparse.Namespace) -> int:
    public, secret = generate_keypair(args.out, args.name)
    console = Console()
    console.print(f"public key  {public}   (share it)")
    console.print(f"secret key  {secret}   (keep it private; mode 0600)")
    console.print("As the monitor (server): run with "
                  f"--curve-secret {secret} --curve-allow CLIENT_KEYS_DIR, and give clients {public}.")
    console.print(f"As a client: copy {public} into the server's CLIENT_KEYS_DIR (its --curve-allow folder); "
                  f"connect with {secret} and the server's public .key file.")
    return 0
