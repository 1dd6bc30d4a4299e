"""Starts a throwaway redis-server for the tests: a free loopback port, no persistence."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` (REDIS_SERVER overrides the binary) on a free port; ``stop()`` ends it."""

    def __init__(self):
        binary = os.environ.get("REDIS_SERVER") or "redis-server"
        self.dir = tempfile.mkdtemp(prefix="aiq-python-client-")
        for attempt in range(4):
            self.port = _free_port()
            log = os.path.join(self.dir, "redis.log")
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self.dir, "--logfile", log],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )
            if self._wait_ready():
                self.url = f"redis://127.0.0.1:{self.port}/"
                return
            self.proc.kill()
            self.proc.wait()
            with open(log, encoding="utf-8", errors="replace") as f:
                output = f.read()
            # Another process may have taken the port between _free_port and the start: retry.
            if "in use" not in output or attempt == 3:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError(f"redis-server did not start on {self.port}: {output[-2000:]}")

    def _wait_ready(self):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1) as r:
                    if r.ping():
                        return True
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        return False

    def client(self, **kwargs):
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class ModuleServer:
    """One RedisServer for a test module, started by its setUpModule::

        server = ModuleServer()
        setUpModule, tearDownModule = server.start, server.stop
    """

    def __init__(self):
        self.server = None

    def start(self):
        self.server = RedisServer()

    def stop(self):
        if self.server is not None:
            self.server.stop()

    @property
    def url(self):
        return self.server.url

    def client(self, **kwargs):
        return self.server.client(**kwargs)
