"""TLS brokers and backend: Python Celery (kombu with ``broker_use_ssl``, redis-py with
``redis_backend_use_ssl``) sends a task over ``amqps://`` or ``rediss://``, our worker runs it and
stores the result over ``rediss://``, and Python reads it back.

The listeners are the test's own, TLS only, with a throwaway CA made by the ``openssl`` CLI: an
asyncio TLS proxy in front of the shared RabbitMQ (never reconfigured) and a ``redis-server``
with ``--port 0 --tls-port``. Both are gone when the test ends. Without ``openssl`` or
``redis-server`` the test is skipped, saying which is missing (``make test`` installs both).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from kombu import Connection, Exchange, Queue

from conftest import AMQP_URL
from interop_app import create_app
from interop_helpers import (
    ARTIFACTS_DIR,
    free_port,
    ready_pattern,
    rust_binary,
    rust_config,
    rust_env,
    start_process,
)

pytestmark = pytest.mark.interop


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install {tool}), so there is no TLS listener "
                    f"to test against")
    return path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """``ca.pem`` and a ``server.pem``/``server.key`` it signed for localhost and 127.0.0.1."""
    need("openssl")
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", f"/CN=rcelery interop CA {uuid.uuid4().hex}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tmp_path)
    openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
            cwd=tmp_path)
    # Python 3.13's default context is X.509-strict: key identifiers are required.
    (tmp_path / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=tmp_path)
    return tmp_path


@pytest.fixture
def amqps_port(pki: Path):
    """Port of a TLS proxy to the shared RabbitMQ, served by an asyncio loop in a thread."""
    upstream = urlsplit(AMQP_URL)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    listening: dict[str, int] = {}
    stop = asyncio.Event()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def proxy(client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(upstream.hostname, upstream.port or 5672)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    async def serve() -> None:
        server = await asyncio.start_server(proxy, "127.0.0.1", 0, ssl=context)
        listening["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        await stop.wait()
        server.close()
        # The proxied connections end with the test, whatever state they are in.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the TLS proxy did not start within 10 s"
    try:
        yield listening["port"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def rediss_port(pki: Path):
    """Port of a TLS-only ``redis-server`` of this test's own."""
    binary = need("redis-server")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(pki), "--tls-auth-clients", "no",
         "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"),
         "--tls-ca-cert-file", str(pki / "ca.pem")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert server.poll() is None, f"redis-server --tls-port exited with {server.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not listen within 10 s"
                time.sleep(0.02)
        yield port
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["amqps", "rediss"])
def test_python_and_rust_exchange_a_task_over_tls(transport, pki, amqps_port, rediss_port):
    ca = str(pki / "ca.pem")
    queue = f"tls-{uuid.uuid4().hex[:12]}"
    # Celery's Redis backend wants its TLS settings on the URL; ours reads that form too.
    backend = f"rediss://127.0.0.1:{rediss_port}/1?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={quote(ca, safe='')}"
    if transport == "amqps":
        broker = f"amqps://guest:guest@127.0.0.1:{amqps_port}//"
        broker_ssl = {"ca_certs": ca, "cert_reqs": "CERT_REQUIRED"}
    else:
        # Celery names the Redis transport's keys after redis-py's.
        broker = f"rediss://127.0.0.1:{rediss_port}/0"
        broker_ssl = {"ssl_ca_certs": ca, "ssl_cert_reqs": "CERT_REQUIRED"}
    node = f"rust-tls-{transport}-{uuid.uuid4().hex[:6]}"
    env = rust_env({
        "CELERY_BROKER_URL": broker,
        "CELERY_BROKER_USE_SSL": json.dumps(broker_ssl),
        "CELERY_RESULT_BACKEND": backend,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "CELERY_TASK_ROUTES": "{}",
    })
    worker = start_process(
        f"Rust worker {node}",
        [rust_binary("worker"), "--config", rust_config(), "-Q", queue, "-c", "2", "-n", f"{node}@%h",
         "--loglevel", "info"],
        env, ARTIFACTS_DIR / f"rust-worker-tls-{node}.log")
    app = create_app(broker, backend, default_queue=queue)
    app.conf.update(broker_use_ssl={key: ssl.CERT_REQUIRED if key.endswith("cert_reqs") else value
                                    for key, value in broker_ssl.items()})
    try:
        worker.wait_for_log(ready_pattern(node), 30)
        result = app.send_task("tasks.add", (2, 3), queue=queue)
        assert result.get(timeout=15) == 5
        assert result.state == "SUCCESS"
    finally:
        app.close()
        worker.stop()
        if transport == "amqps":
            with Connection(AMQP_URL, connect_timeout=5) as conn:
                for entity in (Queue(queue, Exchange(queue), routing_key=queue), Exchange(queue)):
                    try:
                        with conn.channel() as channel:
                            entity.bind(channel).delete()
                    except Exception:  # noqa: BLE001 - cleanup must not mask the result
                        pass
