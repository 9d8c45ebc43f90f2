"""TLS on the client server port, node.api and coordinator.api, with a certificate made for the run."""

import os
import signal
import socket
import ssl
import subprocess

import pytest
import yaml

from conftest import Cluster, MESHGATE, WAIT, make_certificate, running, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two node processes; every listener speaks TLS only."""
    with running(Cluster(tmp_path_factory.mktemp("tls"), workers=2, tls=True)) as instance:
        yield instance


def _presented(port: int) -> bytes:
    """The certificate a TLS handshake with the port presents (DER)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def test_wss_clients_and_https_backends_work_end_to_end(cluster, clients):
    """Clients over wss, a consumer and conn.call over wss /ws/v1, publishes over https: the mesh works on TLS."""
    found = clients(3)
    api = cluster.api()
    for client in found:
        assert api.request("conn.call", {"c": client.client_id, "f": "subscribe", "a": ["secure"]})["E"] is None
    status, body = cluster.http("/v1/mesh/publish", {"c": "secure", "d": "over tls"})
    assert (status, body["r"]) == (200, {"s": 3, "f": 0})
    for client in found:
        assert client.recv() == "over tls"
    assert len(cluster.status()["nodes"]) == 2   # the coordinator HTTP over https


@pytest.mark.parametrize("port_of", ["api_port", "client_port", "coordinator_port"])
def test_plain_requests_to_a_tls_port_get_no_answer(cluster, port_of):
    """A plain HTTP request to a TLS listener gets no HTTP answer (TLS only)."""
    with socket.create_connection(("127.0.0.1", getattr(cluster, port_of)), timeout=WAIT) as raw:
        raw.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(WAIT)
        try:
            answer = raw.recv(100)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP/")


def test_sighup_puts_a_new_certificate_in_force_and_open_connections_stay(cluster, clients, tmp_path):
    """New files at the same paths and SIGHUP: new handshakes get the new certificate; an open wss stays up."""
    [client] = clients(1)
    old = _presented(cluster.client_port)
    fresh_cert, fresh_key = make_certificate(tmp_path, "rotated")
    cluster.cert_path.write_bytes(fresh_cert.read_bytes())
    cluster.cert_key_path.write_bytes(fresh_key.read_bytes())
    os.kill(cluster.process.pid, signal.SIGHUP)
    wait_until(lambda: all(_presented(getattr(cluster, port)) != old
                           for port in ("client_port", "api_port", "coordinator_port") for _ in range(4)),
               what="every listener of every process to present the new certificate")
    cluster.ssl_context.load_verify_locations(cafile=str(cluster.cert_path))
    assert cluster.http("/v1/mesh/send", {"c": client.client_id, "d": "after rotation"})[1]["r"] == {"s": True}
    assert client.recv() == "after rotation"


def test_a_missing_certificate_file_refuses_to_start(tmp_path):
    """A tls key naming a file that does not exist: the command exits 2 naming the key and the file."""
    layout = Cluster(tmp_path, workers=1)
    config = yaml.safe_load(layout.config_path.read_text())
    config["node"]["api"]["tls"] = {"cert_file": "missing.crt", "key_file": "missing.key"}
    layout.config_path.write_text(yaml.safe_dump(config))
    done = subprocess.run([MESHGATE, "start", "-c", str(layout.config_path)], capture_output=True, text=True,
                          timeout=WAIT, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "node.api.tls" in done.stderr and "missing.crt" in done.stderr


def test_a_slow_wss_client_gets_every_frame_in_order(cluster, clients):
    """A wss client that reads nothing for a while: what its TLS socket does not take (SSL's want-write,
    not a plain socket's EAGAIN) waits in the stream, within write_buffer_limit; nothing is lost or reordered."""
    [slow] = clients(1)
    # About 5.6 MB: beyond what the kernel's buffers take (about 2.8 MB here), within the stream's 4 MiB.
    payloads = [f"{index:04d}" + "x" * 40000 for index in range(140)]
    for payload in payloads:
        status, body = cluster.http("/v1/mesh/send", {"c": slow.client_id, "d": payload})
        assert (status, body["E"]) == (200, None)
    assert [slow.recv() for _ in payloads] == payloads
