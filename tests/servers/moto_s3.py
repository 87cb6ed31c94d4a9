#!/usr/bin/env python3
"""Start moto's S3 server on 127.0.0.1 (a free port) for the storage tests.

Usage: moto_s3.py [--auth]
Prints one JSON line {"port": P[, "access_key": ..., "secret_key": ...]} and serves until stdin
closes or the process is killed. With --auth, requests must be SigV4-signed with the printed key
pair (moto checks the signature: a wrong secret gives SignatureDoesNotMatch). Request lines are
logged to stderr (werkzeug format), so tests can see the multipart calls.
"""

import json
import logging
import sys

from moto import settings
from moto.server import ThreadedMotoServer

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
_, port = server.get_host_and_port()
info = {"port": port}
if "--auth" in sys.argv:
    import boto3

    # Requests are unauthenticated until INITIAL_NO_AUTH_ACTION_COUNT is reached: make a user first.
    iam = boto3.client(
        "iam",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
        region_name="us-east-1",
    )
    iam.create_user(UserName="tester")
    key = iam.create_access_key(UserName="tester")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=json.dumps(policy))
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    info.update(access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])
print(json.dumps(info), flush=True)
sys.stdin.read()
server.stop()
