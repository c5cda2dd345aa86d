"""The shared MLflow REST client against a real tracking server and against hostile HTTP servers."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient

from captchaops.settings import load_settings
from captchaops.tracking_rest import (
    ARTIFACTS,
    ArtifactTooLarge,
    TrackingError,
    TrackingRest,
    TrackingUnreachable,
    VersionRef,
)
from captchaops.webapp.tracking_client import Tracking
from tests.fixtures.stack import Tracking as TrackingServer

Handler = Callable[[BaseHTTPRequestHandler], tuple[int, bytes]]


@contextmanager
def http_server(answer: Handler) -> Iterator[str]:
    """A real HTTP server in a thread whose every GET is answered by `answer`; yields its URL."""

    class Handle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answer(self)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


@pytest.fixture(scope="module")
def registered(
    tracking_server: TrackingServer, tmp_path_factory: pytest.TempPathFactory
) -> VersionRef:
    """A registered version of a small file tree (nested folder, binary file) with alias `rest`."""
    tree = tmp_path_factory.mktemp("tree")
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "MLmodel").write_text("flavors: {}\n")
    (tree / "sub" / "deeper" / "blob.bin").write_bytes(bytes(range(256)) * 300)
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    experiment = client.create_experiment(f"rest-tests-{os.getpid()}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(tree), "model")
    client.set_terminated(run.info.run_id)
    name = f"rest-model-{os.getpid()}"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(name, "rest", version.version)
    return VersionRef(name, str(version.version), run.info.run_id)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_alias_lookup_names_the_version_or_nothing(
    tracking_server: TrackingServer, registered: VersionRef
) -> None:
    rest = TrackingRest(tracking_server.uri)
    assert rest.alias_version(registered.name, "rest") == registered
    assert rest.alias_version(registered.name, "no-such-alias") is None
    assert rest.alias_version("no-such-model", "rest") is None


def test_a_version_downloads_through_the_proxy_without_importing_mlflow(
    tracking_server: TrackingServer, registered: VersionRef, tmp_path: Path
) -> None:
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from captchaops.tracking_rest import TrackingRest\n"
        "rest = TrackingRest(sys.argv[1])\n"
        "uri = rest.download_uri(sys.argv[2], sys.argv[3])\n"
        "local = rest.download_artifacts(uri, Path(sys.argv[4]))\n"
        "print(json.dumps({'local': str(local), 'uri': uri,\n"
        "    'mlflow': 'mlflow' in sys.modules, 'pandas': 'pandas' in sys.modules}))\n"
    )
    dest = tmp_path / "copy"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            tracking_server.uri,
            registered.name,
            registered.version,
            dest,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(done.stdout)
    assert out["uri"].startswith("runs:/")
    assert out == {**out, "mlflow": False, "pandas": False}
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    reference = Path(client.download_artifacts(registered.run_id, "model", str(tmp_path / "ref")))
    assert files_under(Path(out["local"])) == files_under(reference)
    assert "sub/deeper/blob.bin" in files_under(Path(out["local"]))


def test_a_download_over_its_byte_limit_is_refused(
    tracking_server: TrackingServer, registered: VersionRef, tmp_path: Path
) -> None:
    rest = TrackingRest(tracking_server.uri)
    uri = rest.download_uri(registered.name, registered.version)
    with pytest.raises(ArtifactTooLarge):
        rest.download_artifacts(uri, tmp_path / "copy", max_bytes=1000)


def test_a_listing_that_leaves_its_folder_is_refused(tmp_path: Path) -> None:
    def answer(request: BaseHTTPRequestHandler) -> tuple[int, bytes]:
        if "?" in request.path:
            return 200, json.dumps({"files": [{"path": "../../escaped", "is_dir": False}]}).encode()
        return 200, b"payload"

    with http_server(answer) as url, pytest.raises(TrackingError, match="unsafe path"):
        TrackingRest(url).download_artifacts("mlflow-artifacts:/1/x", tmp_path / "a" / "b")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_named_files_download_alone_and_may_not_leave_their_folder(tmp_path: Path) -> None:
    asked: list[str] = []

    def answer(request: BaseHTTPRequestHandler) -> tuple[int, bytes]:
        asked.append(request.path)
        return 200, b"payload of " + request.path.encode()

    with http_server(answer) as url:
        rest = TrackingRest(url)
        rest.download_files("mlflow-artifacts:/1/m", tmp_path / "ok", ["MLmodel", "a/b.onnx"])
        for bad in ("../escaped", "/etc/passwd", "a/../../x"):
            with pytest.raises(TrackingError, match="leaves its folder"):
                rest.download_files("mlflow-artifacts:/1/m", tmp_path / "bad", [bad])
        with pytest.raises(TrackingError, match="not proxied"):
            rest.download_files("s3://bucket/m", tmp_path / "s3", ["MLmodel"])
    assert asked == [f"{ARTIFACTS}/1/m/MLmodel", f"{ARTIFACTS}/1/m/a/b.onnx"]
    assert files_under(tmp_path / "ok") == {
        "MLmodel": f"payload of {ARTIFACTS}/1/m/MLmodel".encode(),
        "a/b.onnx": f"payload of {ARTIFACTS}/1/m/a/b.onnx".encode(),
    }
    assert not (tmp_path / "bad").exists() or files_under(tmp_path / "bad") == {}


def test_a_silent_server_times_out_instead_of_hanging(tmp_path: Path) -> None:
    with silent_server() as url:
        rest = TrackingRest(url, timeout=1.0)
        with pytest.raises(TrackingUnreachable):
            rest.alias_version("m", "a")
        with pytest.raises(TrackingUnreachable):
            rest.download_artifacts(
                "mlflow-artifacts:/1/x", tmp_path, deadline=time.monotonic() + 1.0
            )


def test_errors_never_carry_the_address_or_its_password() -> None:
    rest = TrackingRest("http://ann:s3cret-pass@127.0.0.1:9")
    with pytest.raises(TrackingUnreachable) as caught:
        rest.call("GET", "/api/2.0/mlflow/experiments/search")
    assert "s3cret" not in str(caught.value) and "127.0.0.1" not in str(caught.value)


def test_team_mode_credentials_come_from_settings(tmp_path: Path) -> None:
    seen: list[str] = []

    def answer(request: BaseHTTPRequestHandler) -> tuple[int, bytes]:
        seen.append(request.headers.get("Authorization", ""))
        return 200, b"{}"

    with http_server(answer) as url:
        settings = load_settings(
            home=tmp_path,
            tracking_uri=url,
            tracking_username="captchaops-service",
            tracking_password="long-enough-password",
        )
        TrackingRest.for_settings(settings).call("GET", "/api/2.0/mlflow/experiments/search")
        TrackingRest(url).call("GET", "/api/2.0/mlflow/experiments/search")
    token = base64.b64encode(b"captchaops-service:long-enough-password").decode()
    assert seen == [f"Basic {token}", ""]


def test_the_web_app_gets_visitor_safe_sentences(
    tracking_server: TrackingServer, tmp_path: Path
) -> None:
    down = Tracking(load_settings(home=tmp_path, tracking_uri="http://127.0.0.1:9"), 2.0)
    with pytest.raises(TrackingError, match=r"^The tracking server is not reachable"):
        down.call("GET", "experiments/search")
    up = Tracking(load_settings(home=tmp_path, tracking_uri=tracking_server.uri), 10.0)
    assert up.call("GET", "registered-models/get", params={"name": "never-registered"}) == {}
    with pytest.raises(TrackingError, match=r"^The tracking server answered HTTP 400"):
        up.call("GET", "runs/get", params={"run_id": ""})
