"""The ``tensorizer-rs`` command: ``inspect``, ``verify``, ``keygen`` and ``s3-uploads``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from . import _native
from ._progress import terminal_bar
from .exceptions import TensorizerError
from .utils import convert_bytes

_TYPES = {0: "param", 1: "buffer", 2: "state_dict"}


def _dtype_name(e: dict) -> str:
    if e["torch_dtype"]:
        return e["torch_dtype"]
    from ._dtypes import CONTAINER_TO_TORCH

    return CONTAINER_TO_TORCH.get(e["container"], e["container"])


def _encryption(f) -> dict | None:
    if not f.encrypted:
        return None
    for i, e in enumerate(f.entries()):
        crypt = f.header_info(i).get("crypt") or {}
        if crypt.get("cipher"):
            out = {"cipher": crypt["cipher"], "key": "raw key"}
            if "kdf" in crypt:
                ops, mem, alg, salt = crypt["kdf"]
                out.update(
                    key="passphrase (Argon2id)",
                    opslimit=ops,
                    memlimit=mem,
                    alg=alg,
                    salt=salt.hex(),
                )
            return out
    return {"cipher": None, "key": "unknown (no encrypted tensor data)"}


def cmd_inspect(args) -> int:
    f = _native.TensorFile(args.file)
    entries = f.entries()
    enc = _encryption(f)
    info = {
        "file": args.file,
        "data_version": f.version,
        "feature_flags": f.flags,
        "tensor_count": len(entries),
        "index_bytes": f.index_len,
        "file_bytes": f.file_size,
        "encrypted": enc is not None,
        "encryption": enc,
        "tensors": [
            {
                "name": list(e["name"]) if isinstance(e["name"], tuple) else e["name"],
                "type": _TYPES.get(e["tensor_type"], e["tensor_type"]),
                "dtype": _dtype_name(e),
                "shape": list(e["shape"]),
                "bytes": e["nbytes"],
                "meta": e["data_length"] == 0 and e["nbytes"] > 0,
            }
            for e in entries
        ],
    }
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        print()
        return 0
    print(
        f"{args.file}: data version {f.version}, flags {f.flags}, {len(entries)} tensors, "
        f"{convert_bytes(sum(e['nbytes'] for e in entries))}"
    )
    if enc:
        extra = "".join(f", {k} {enc[k]}" for k in ("opslimit", "memlimit") if k in enc)
        print(f"encrypted: {enc['cipher']}, {enc['key']}{extra}")
    else:
        print("encrypted: no")
    width = max((len(str(t["name"])) for t in info["tensors"]), default=4)
    for t in info["tensors"]:
        meta = " (meta)" if t["meta"] else ""
        print(
            f"  {t['name']!s:<{width}}  {t['type']:<10} {t['dtype']:<16} {t['shape']!s:<20} {t['bytes']}{meta}"
        )
    return 0


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


def cmd_verify(args) -> int:
    kw = {}
    if args.keyfile:
        with open(args.keyfile, "rb") as k:
            kw["key"] = k.read()
    elif args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if passphrase is None:
            raise UsageError(
                f"--passphrase-env {args.passphrase_env}: that environment variable is not set"
            )
        kw["passphrase"] = passphrase.encode()
        for name in ("max_opslimit", "max_memlimit"):
            if getattr(args, name) is not None:
                kw[name] = getattr(args, name)
    f = _native.TensorFile(args.file)
    if f.encrypted and not kw:
        raise UsageError(
            f"{args.file} is encrypted: pass its key with --keyfile FILE or "
            "--passphrase-env VARIABLE"
        )
    entries = f.entries()
    start = time.perf_counter()
    total = 0
    with terminal_bar(sum(e["data_length"] for e in entries), "verify") as bar:
        for i, e in enumerate(entries):  # one at a time, so the first bad tensor is named
            f.load([i], verify_hash=True, **kw)
            total += e["data_length"]
            bar.update(e["data_length"])
    secs = time.perf_counter() - start
    print(f"OK: {len(entries)} tensors, {convert_bytes(total)} verified in {secs:.2f}s")
    return 0


def cmd_keygen(args) -> int:
    fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    print(f"wrote a random 32-byte key to {args.path} (mode 0600)")
    return 0


def cmd_s3_uploads(args) -> int:
    storage = {"s3_endpoint": args.endpoint} if args.endpoint else None
    uploads = _native.s3_pending_uploads(args.uri, storage)
    now = time.time()
    aborted = 0
    for uri, upload_id, initiated in uploads:
        age = None if initiated is None else now - initiated
        when = "?" if age is None else f"{age / 3600:.1f} h ago"
        # Only uploads old enough to have no live writer, unless told otherwise.
        due = args.abort and (age is None or age >= args.older_than)
        if due:
            _native.s3_abort_upload(uri, upload_id, storage)
            aborted += 1
        state = "aborted" if due else "pending"
        print(f"{state}  {uri}  started {when}  upload {upload_id}")
    if args.abort:
        print(f"{aborted} of {len(uploads)} pending uploads aborted")
    else:
        print(f"{len(uploads)} pending uploads")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tensorizer-rs", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="show a file's header and tensors")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(fn=cmd_inspect)
    v = sub.add_parser("verify", help="check every tensor's stored hashes")
    v.add_argument("file")
    v.add_argument("--keyfile", help="raw 32-byte key file, for encrypted files")
    v.add_argument(
        "--passphrase-env", help="name of an environment variable holding the passphrase"
    )
    for flag, what in (("--max-opslimit", "passes"), ("--max-memlimit", "bytes")):
        v.add_argument(
            flag,
            type=int,
            help=f"raise the bound on the key derivation {what} a passphrase file may ask for",
        )
    v.set_defaults(fn=cmd_verify)
    k = sub.add_parser("keygen", help="write a random 32-byte key file (mode 0600)")
    k.add_argument("path")
    k.set_defaults(fn=cmd_keygen)
    u = sub.add_parser(
        "s3-uploads",
        help="list (and abort) multipart uploads that killed writers left under an S3 prefix",
        description="S3 keeps the parts of an upload whose writer died before completing or "
        "aborting it, and bills them, until it is aborted (see docs/storage.md for the "
        "lifecycle rule that does this automatically). Credentials and endpoint as for loads "
        "(S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_ENDPOINT_URL, ~/.s3cfg, the AWS chain).",
    )
    u.add_argument("uri", help="s3://bucket[/prefix]")
    u.add_argument("--abort", action="store_true", help="abort them (their parts are deleted)")
    u.add_argument(
        "--older-than",
        type=float,
        default=3600,
        metavar="SECONDS",
        help="with --abort, only uploads started at least this long ago, so that writers "
        "still running are left alone (default 3600)",
    )
    u.add_argument("--endpoint", help="S3 endpoint URL (default: as for loads)")
    u.set_defaults(fn=cmd_s3_uploads)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:
        # The reader went away (`inspect ... | head`): stop quietly. Point stdout at /dev/null
        # so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as e:
        print(f"tensorizer-rs {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (TensorizerError, OSError) as e:
        print(f"tensorizer-rs {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
