"""Stores on a real S3 API: moto's S3 server on localhost, reached by s3fs through AWS_ENDPOINT_URL and
fake credentials in the environment, exactly as a user's bucket would be. The capture is killed at
chosen requests (the server freezes there, the process gets SIGKILL) and resumed; the result must be
the uninterrupted local capture, array for array and checksum for checksum."""

import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore

from tests.test_capture_scale import SETTINGS, assert_same_store
from tests.test_cli import SMALL_STUDENT

REPO = Path(__file__).resolve().parents[1]


class FreezingS3(ThreadedMotoServer):
    """moto's S3 server that can freeze at the first request a rule matches: `before` it is served
    (the write never lands) or right after. Every later request waits until `thaw`, then fails: the
    client that sent them is killed meanwhile, so nothing it had in flight lands afterwards."""

    def __init__(self):
        super().__init__("127.0.0.1", 0, verbose=False)
        self.rule, self.reached, self.thawed, self.frozen = None, threading.Event(), threading.Event(), False

    def freeze_at(self, method: str, path_pattern: str, body_contains: bytes = b"", before: bool = True):
        self.rule = (method, re.compile(path_pattern), body_contains, before)
        self.reached.clear(), self.thawed.clear()

    def thaw(self):
        self.rule, self.frozen = None, False
        self.thawed.set()

    def _matches(self, environ) -> bool:
        if self.rule is None:
            return False
        method, pattern, body_contains, _ = self.rule
        if environ["REQUEST_METHOD"] != method or not pattern.search(environ["PATH_INFO"]):
            return False
        if body_contains:
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = BytesIO(body)  # put back for moto
            return body_contains in body
        return True

    def _wait_and_fail(self, start_response):
        self.thawed.wait()
        start_response("503 Service Unavailable", [("Content-Length", "0")])
        return [b""]

    def _server_entry(self):
        app = DomainDispatcherApplication(create_backend_app)

        def gate(environ, start_response):
            if self.frozen:
                return self._wait_and_fail(start_response)
            if self._matches(environ):
                before = self.rule[3]
                if before:
                    self.frozen = True
                    self.reached.set()
                    return self._wait_and_fail(start_response)
                response = list(app(environ, start_response))
                self.frozen = True
                self.reached.set()
                return response
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, gate, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


@pytest.fixture(scope="module")
def s3_server():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = FreezingS3()
    server.start()
    host, port = server.get_host_and_port()
    settings = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)  # subprocesses inherit them
    yield server
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    server.stop()


_buckets = itertools.count()


@pytest.fixture
def bucket(s3_server):
    """A new, empty bucket on the S3 server; returns its s3:// URL."""
    import s3fs

    name = f"kdcache-test-{next(_buckets)}"
    s3fs.S3FileSystem().mkdir(name)
    yield f"s3://{name}"
    s3_server.thaw()


@pytest.fixture
def cache(kdcache, small_teacher, small_tokens):
    def run(out, *extra):
        return kdcache("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out, *SETTINGS, *extra)
    return run


def test_prepare_capture_verify_inspect_and_student_on_s3(kdcache, bucket, small_corpus, small_tokens,
                                                         small_teacher, small_targets, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_CACHE", str(tmp_path / "cache"))  # local copies of token stores at URLs
    monkeypatch.chdir(tmp_path)
    tokens, url = f"{bucket}/runs/tokens", f"{bucket}/runs/targets.zarr"
    result = kdcache("prepare", "--out", tokens, "--corpus", small_corpus, "--vocab-size", 300,
                     "--block-size", 32, "--val-fraction", 0.3)  # as small_tokens
    assert result.exit_code == 0, result.output
    fingerprint = json.loads((small_tokens / "meta.json").read_text())["fingerprint"]
    assert fingerprint in result.output and (tmp_path / "cache" / "tokens" / fingerprint / "train.arrow").exists()
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", tokens, "--out", url, *SETTINGS)
    assert result.exit_code == 0, result.output
    assert_same_store(url, small_targets)
    assert os.listdir(tmp_path) == ["cache"]  # nothing written to local `s3:` directories
    assert kdcache("verify", url).exit_code == 0
    shown = kdcache("inspect", url)
    assert shown.exit_code == 0 and "complete (5/5 shards)" in shown.output and "bytes/token" in shown.output
    plot = tmp_path / "tail.svg"
    assert kdcache("inspect", url, "--plot", plot).exit_code == 0 and plot.read_text().startswith("<svg")
    shutil.rmtree(tmp_path / "cache")  # the student copies the token store again
    result = kdcache("student", "--tokens", tokens, "--targets", url, "--out", tmp_path / "student",
                     "--max-steps", 2, *SMALL_STUDENT)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "student" / "model.safetensors").exists()
    # A second capture of the same settings finds the store complete and leaves it so.
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", tokens, "--out", url, *SETTINGS)
    assert result.exit_code == 0, result.output
    assert_same_store(url, small_targets)


def test_a_token_store_url_without_meta_json_is_no_token_store(kdcache, bucket, small_teacher, tmp_path):
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", f"{bucket}/nothing", "--out", tmp_path / "t.zarr")
    assert result.exit_code == 1
    assert f"{bucket}/nothing is not a finished token store (no meta.json); run `kdcache prepare" in result.output


def capture_process(small_teacher, small_tokens, out) -> subprocess.Popen:
    """`kdcache cache` in a process of its own (to be killed), on this source tree."""
    args = ["cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out, *SETTINGS]
    return subprocess.Popen([sys.executable, "-c", "from stages.cli import main; main()", *map(str, args)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# Where the capture is killed: (method, path pattern, body holding, before the request is served).
KILL_POINTS = {
    "after the first shard record": ("PUT", rf"/{fmt.RECORDS}/{fmt.record_name(0)}/zarr\.json$", b"", False),
    "while writing a shard record": ("PUT", rf"/{fmt.RECORDS}/{fmt.record_name(2)}/zarr\.json$", b"", True),
    "while writing a shard's arrays": ("PUT", r"/topk_logprobs/c/3/", b"", True),
    "while writing `complete`": ("PUT", r"/targets\.zarr/zarr\.json$", b'"complete": true', True),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_capture_killed_on_s3_resumes_to_the_uninterrupted_store(kdcache, cache, bucket, s3_server, point,
                                                                   small_teacher, small_tokens, small_targets):
    url = f"{bucket}/targets.zarr"
    s3_server.freeze_at(*KILL_POINTS[point])
    process = capture_process(small_teacher, small_tokens, url)
    try:
        while not s3_server.reached.wait(timeout=1) and process.poll() is None:
            pass  # until the server freezes at the kill point, or the capture ends without reaching it
        reached = s3_server.reached.is_set()
    finally:
        process.send_signal(signal.SIGKILL)
        stderr = process.communicate()[1].decode(errors="replace")
        s3_server.thaw()
    assert reached, f"the capture never reached {point}: {stderr[-3000:]}"
    killed = TargetsStore(url, require_complete=False)
    assert not killed.attrs["complete"]  # never looks complete before it is
    assert 0 < len(killed.records) < len(killed.shard_ranges) or point == "while writing `complete`"
    assert kdcache("verify", url).exit_code == 1
    result = cache(url)  # the killed process's lock is stale: taken over
    assert result.exit_code == 0, result.output
    assert "taking over the stale lock" in result.output
    assert_same_store(url, small_targets)
    store, reference = TargetsStore(url), TargetsStore(small_targets)
    decoded, expected = store.decode(store.read_rows(0, store.rows)), reference.decode(reference.read_rows(0, store.rows))
    for name in expected:
        np.testing.assert_array_equal(decoded[name].numpy(), expected[name].numpy())
    assert kdcache("verify", url).exit_code == 0


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process descended from it (read from /proc), children first found."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(parents.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_two_rank_capture_killed_on_s3_resumes_to_the_uninterrupted_store(kdcache, bucket, s3_server,
                                                                         small_teacher, small_tokens, small_targets):
    """torchrun, 2 ranks writing one store on S3 (rank r: shards r, r + 2, ...), killed -9 as a whole
    while rank 1 writes shard 3's record; resumed by 2 ranks again."""
    url = f"{bucket}/targets.zarr"
    args = ["cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", url, *SETTINGS, "--device", "cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--",
               str(Path(sys.executable).parent / "kdcache"), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run_two_ranks() -> subprocess.Popen:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    s3_server.freeze_at("PUT", rf"/{fmt.RECORDS}/{fmt.record_name(3)}/zarr\.json$", b"", True)
    process = run_two_ranks()
    try:
        while not s3_server.reached.wait(timeout=1) and process.poll() is None:
            pass
        reached = s3_server.reached.is_set()
    finally:
        kill_tree(process.pid)  # the launcher and its ranks (each rank is a session of its own)
        stderr = process.communicate()[1].decode(errors="replace")
        s3_server.thaw()
    assert reached, f"the capture never reached shard 3's record: {stderr[-3000:]}"
    killed = TargetsStore(url, require_complete=False)
    assert not killed.attrs["complete"] and fmt.record_name(3) not in killed.records
    assert kdcache("verify", url).exit_code == 1
    resumed = run_two_ranks()
    out, err = (text.decode(errors="replace") for text in resumed.communicate(timeout=600))
    assert resumed.returncode == 0, out[-3000:] + err[-6000:]
    assert "resuming:" in out + err and "taking over the stale lock" in out + err
    assert_same_store(url, small_targets)
    assert kdcache("verify", url).exit_code == 0
