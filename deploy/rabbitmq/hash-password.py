#!/usr/bin/env python3
"""Prints a RabbitMQ password_hash for definitions.json.

RabbitMQ's documented scheme (rabbit_password_hashing_sha256): a random 32-bit
salt, SHA-256 over salt + UTF-8 password, base64 of salt + digest.
Usage: python3 hash-password.py 'the-password'
"""
import base64
import hashlib
import os
import sys

if len(sys.argv) != 2:
    sys.exit("usage: hash-password.py PASSWORD")
salt = os.urandom(4)
digest = hashlib.sha256(salt + sys.argv[1].encode("utf-8")).digest()
print(base64.b64encode(salt + digest).decode("ascii"))
