"""A local S3 (moto's threaded server on a free loopback port), for the adapter-source tests."""
from __future__ import annotations

import contextlib
import socket


@contextlib.contextmanager
def local_s3():
    """Yields the AWS_* environment that points boto3 (in this process or an engine's) at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        server.stop()
