"""An independent reader of logtap's sealed records, written from docs/ENCRYPTION.md.

Usage: open_sealed.py KEYS_DIR < messages.jsonl
Each input line is a JSON object {"value": base64 of a Kafka value}. Each output line is
{"tenant", "key_id", "service", "module", "path", "seq", "value": base64} for a record that
opened, or {"error": why} for one that did not.
"""

import base64
import json
import os
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO = b"logtap sealed record v1"


def load_keys(directory):
    keys = {}
    for name in os.listdir(directory):
        if name.startswith(".") or not name.endswith(".key"):
            continue
        tenant, key_id = name[: -len(".key")].rsplit(".", 1)
        with open(os.path.join(directory, name), "rb") as f:
            keys[(tenant, key_id)] = f.read()
    return keys


def open_sealed(data, keys):
    if data[:4] != b"LTS\x01":
        raise ValueError("no magic")
    if data[4] != 1:
        raise ValueError("unknown algorithm %d" % data[4])
    timestamp, seq, length = struct.unpack_from(">QQI", data, 5)
    salt = data[25:41]
    nonce = data[41:53]
    at, fields = 53, []
    for _ in range(6):
        (n,) = struct.unpack_from(">H", data, at)
        fields.append(data[at + 2 : at + 2 + n].decode("utf-8"))
        at += 2 + n
    tenant, key_id, host, service, module, path = fields
    identity = data[53:at]
    ciphertext = data[at : at + length]
    if len(ciphertext) != length or at + length != len(data):
        raise ValueError("wrong length")
    secret = keys.get((tenant, key_id))
    if secret is None:
        raise ValueError("no key %s.%s" % (tenant, key_id))
    record_key = HKDF(algorithm=SHA256(), length=32, salt=salt, info=INFO + identity).derive(secret)
    value = AESGCM(record_key).decrypt(nonce, ciphertext, data[:25])
    return {
        "tenant": tenant,
        "key_id": key_id,
        "host": host,
        "service": service,
        "module": module,
        "path": path,
        "timestamp_ns": timestamp,
        "seq": seq,
        "value": base64.b64encode(value).decode("ascii"),
    }


def main():
    keys = load_keys(sys.argv[1])
    for line in sys.stdin:
        if not line.strip():
            continue
        data = base64.b64decode(json.loads(line)["value"])
        try:
            out = open_sealed(data, keys)
        except InvalidTag:
            out = {"error": "authentication failed"}
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
            out = {"error": str(e)}
        sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
