"""The hub examples, run as programs and driven through real sockets (and socat/nc)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def start(name: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / name), "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, int(line.split()[-1])


@pytest.fixture
def echo_server(request: pytest.FixtureRequest) -> Iterator[int]:
    proc, port = start("echo_hub.py", *getattr(request, "param", ()))
    yield port
    proc.terminate()
    proc.wait(10)
    assert proc.stdout is not None
    proc.stdout.close()


def lines(sock: socket.socket, n: int) -> list[bytes]:
    buf = b""
    while buf.count(b"\n") < n:
        got = sock.recv(65536)
        if not got:
            break
        buf += got
    return buf.split(b"\n")[:n]


@pytest.mark.parametrize("echo_server", [(), ("--threads",)], indirect=True,
                         ids=["asyncio", "threads"])
def test_echo_example(echo_server: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", echo_server), timeout=10)
             for _ in range(20)]
    for i, sock in enumerate(socks):
        sock.sendall(b"hello %d\n" % i)
    for i, sock in enumerate(socks):
        assert lines(sock, 1) == [b"hello %d" % i]
    for sock in socks[:10]:  # leave with echoes in flight
        sock.sendall(b"x\n" * 1000)
        sock.close()
    sock = socks[10]
    sock.sendall(b"after\n")
    assert lines(sock, 1) == [b"after"]
    for sock in socks[10:]:
        sock.close()


@pytest.mark.parametrize("tool", ["socat", "nc"])
def test_echo_example_with_a_standard_client(echo_server: int, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    if tool == "socat":
        cmd = ["socat", "-t", "5", "-", f"TCP:127.0.0.1:{echo_server}"]
    else:
        cmd = ["nc", "-N", "127.0.0.1", str(echo_server)]
    # the client sends, then shuts its side down: the replies still arrive
    done = subprocess.run(cmd, input=b"hello\nworld\n", capture_output=True, timeout=20)
    assert done.stdout == b"hello\nworld\n", done


def test_pubsub_example() -> None:
    proc, port = start("pubsub_hub.py")
    try:
        subs = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        pub = socket.create_connection(("127.0.0.1", port), timeout=10)
        for sub in subs:
            sub.sendall(b"SUB news\n")
            assert lines(sub, 1) == [b"OK SUB news"]
        subs[0].sendall(b"SUB sport\n")
        assert lines(subs[0], 1) == [b"OK SUB sport"]
        pub.sendall(b"PUB news hello all\n")
        assert lines(pub, 1) == [b"OK PUB news 5"]
        for sub in subs:
            assert lines(sub, 1) == [b"MSG news hello all"]
        subs[1].sendall(b"UNSUB news\n")
        assert lines(subs[1], 1) == [b"OK UNSUB news"]
        subs[2].close()  # a closed connection leaves every topic
        time.sleep(0.2)
        pub.sendall(b"PUB news again\nPUB sport goal\nNONSENSE\n")
        assert lines(pub, 3) == [b"OK PUB news 3", b"OK PUB sport 1",
                                 b"ERR expected SUB topic, UNSUB topic or PUB topic message"]
        assert lines(subs[0], 2) == [b"MSG news again", b"MSG sport goal"]
        for sub in (subs[3], subs[4]):
            assert lines(sub, 1) == [b"MSG news again"]
        for s in [*subs, pub]:
            s.close()
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_hub_at_its_open_file_limit_resets_instead_of_dropping_silently() -> None:
    """The echo example under an open-file limit of 200: the hub's default
    `max_connections` (100) is below it, so of 150 clients each is answered or reset.
    Before, the hub ran out of files, and libuv closed every connection waiting to be
    accepted: 65 of 150 clients read an EOF, with nothing logged or counted."""
    proc = subprocess.Popen(["prlimit", "--nofile=200:200", sys.executable,
                             str(EXAMPLES / "echo_hub.py"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        port = int(line.split()[-1])
        got: list[str] = []
        clients = []
        for _ in range(150):
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            except ConnectionResetError:
                got.append("reset")
        for i, client in enumerate(clients):
            try:
                client.sendall(b"%d\n" % i)
                answer = lines(client, 1)
                got.append("echo" if answer == [b"%d" % i] else repr(answer))
            except ConnectionResetError:
                got.append("reset")
        for client in clients:
            client.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert sorted(set(got)) == ["echo", "reset"], got
    assert got.count("echo") == 100
    assert "100 connections open (max_connections 100)" in err, err
