"""A Hugging Face Hub on 127.0.0.1 for tests: the endpoints huggingface_hub uses to upload and download.

Upload (``HfApi.create_repo`` / ``create_branch`` / ``upload_folder``): ``POST /api/repos/create``,
``POST /api/validate-yaml`` (the card's header must parse),
``POST /api/models/{repo}/branch/{branch}``, ``POST /api/models/{repo}/preupload/{rev}``, the Git LFS
batch API ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT`` of the object (basic transfer), and
``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, regular files base64, LFS pointers).
Download (``hf_hub_download``): ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``,
``ETag`` / ``X-Linked-Etag`` / ``X-Linked-Size`` and byte ranges; errors carry ``X-Error-Code`` as the
Hub's do (RepoNotFound, RevisionNotFound, EntryNotFound). Writes need an ``Authorization`` header.

Start with :func:`serve`; point huggingface_hub at it with ``HF_ENDPOINT``. ``requests`` logs every
request (method, path) so a test can tell whether a load touched the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".tflite")


@dataclass
class Commit:
    sha: str
    files: Dict[str, bytes]
    lfs: Dict[str, bool]


@dataclass
class Repo:
    commits: Dict[str, Commit] = field(default_factory=dict)
    refs: Dict[str, str] = field(default_factory=dict)


class FakeHub:
    def __init__(self) -> None:
        self.repos: Dict[str, Repo] = {}
        self.lfs_objects: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server: Optional[ThreadingHTTPServer] = None
        self.counter = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def resolve(self, repo_id: str, revision: str) -> Optional[Commit]:
        repo = self.repos[repo_id]
        sha = repo.refs.get(revision, revision)
        return repo.commits.get(sha)

    def tamper(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Replace a file in place (same commit), as a compromised or corrupted store would."""
        commit = self.resolve(repo_id, revision)
        assert commit is not None
        commit.files[path] = data

    def new_commit(self, repo_id: str, parent: Optional[Commit], files: Dict[str, bytes], lfs: Dict[str, bool]) -> Commit:
        self.counter += 1
        merged = dict(parent.files) if parent else {}
        merged_lfs = dict(parent.lfs) if parent else {}
        merged.update(files)
        merged_lfs.update(lfs)
        digest = hashlib.sha1(f"{repo_id}:{self.counter}".encode())
        for name in sorted(merged):
            digest.update(name.encode() + hashlib.sha256(merged[name]).digest())
        commit = Commit(digest.hexdigest(), merged, merged_lfs)
        self.repos[repo_id].commits[commit.sha] = commit
        return commit


def _handler(hub: FakeHub) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        # ---------------------------------------------------------------- helpers
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
                  content_type: str = "application/json", head: bool = False, length: Optional[int] = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, status: int, obj: object, headers: Optional[Dict[str, str]] = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

        def _authorized(self) -> bool:
            if not self.headers.get("Authorization", "").startswith("Bearer "):
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return False
            return True

        # ---------------------------------------------------------------- routes
        def do_HEAD(self) -> None:  # noqa: N802
            self._download(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._download(head=False)

        def do_PUT(self) -> None:  # noqa: N802
            path = urllib.parse.urlparse(self.path).path
            hub.requests.append(("PUT", path))
            match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            data = self._body()
            if not match:
                return self._error(404, "NotFound", path)
            if hashlib.sha256(data).hexdigest() != match.group(1):
                return self._error(400, "BadRequest", "sha256 does not match the object id")
            with hub.lock:
                hub.lfs_objects[match.group(1)] = data
            self._send(200)

        def do_POST(self) -> None:  # noqa: N802
            path = urllib.parse.urlparse(self.path).path
            hub.requests.append(("POST", path))
            body = self._body()
            if not self._authorized():
                return
            if path == "/api/validate-yaml":
                # the Hub checks a README's YAML header before a commit; so does this one
                import yaml

                content = json.loads(body)["content"]
                header = content.split("---")[1] if content.startswith("---") else ""
                try:
                    yaml.safe_load(header)
                except yaml.YAMLError as exc:
                    return self._json(400, {"error": f"Invalid metadata in README.md: {exc}"})
                return self._json(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                with hub.lock:
                    if repo_id in hub.repos:  # the Hub's 409 carries the repo's URL too
                        return self._json(409, {"error": "You already created this model repo",
                                                "url": f"{hub.url}/{repo_id}"})
                    hub.repos[repo_id] = Repo()
                return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
            if match:
                repo_id, action, revision = match.group(1), match.group(2), urllib.parse.unquote(match.group(3))
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                         "shouldIgnore": False} for f in files]})
                if action == "branch":
                    with hub.lock:
                        repo = hub.repos[repo_id]
                        if revision in repo.refs:
                            return self._error(409, "BranchExists", "branch exists")
                        repo.refs[revision] = repo.refs.get("main", "")
                    return self._json(200, {})
                return self._commit(repo_id, revision, body)
            match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if match:
                payload = json.loads(body)
                objects = []
                for obj in payload["objects"]:
                    entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in hub.lfs_objects:
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}}}
                    objects.append(entry)
                return self._json(200, {"transfer": "basic", "objects": objects})
            self._error(404, "NotFound", path)

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            files: Dict[str, bytes] = {}
            lfs: Dict[str, bool] = {}
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs[value["path"]] = False
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        return self._error(400, "BadRequest", f"LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = hub.lfs_objects[value["oid"]]
                    lfs[value["path"]] = True
            with hub.lock:
                repo = hub.repos[repo_id]
                parent_sha = repo.refs.get(revision)
                parent = repo.commits.get(parent_sha) if parent_sha else None
                commit = hub.new_commit(repo_id, parent, files, lfs)
                repo.refs[revision] = commit.sha
            # the real Hub answers with its public URL; huggingface_hub parses it for the repo id
            self._json(200, {"commitUrl": f"https://huggingface.co/{repo_id}/commit/{commit.sha}",
                             "commitOid": commit.sha})

        def _download(self, head: bool) -> None:
            path = urllib.parse.urlparse(self.path).path
            hub.requests.append(("HEAD" if head else "GET", path))
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not match:
                return self._error(404, "NotFound", path, head)
            repo_id, revision, filename = match.group(1), urllib.parse.unquote(match.group(2)), match.group(3)
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            commit = hub.resolve(repo_id, revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            if filename not in commit.files:
                return self._error(404, "EntryNotFound", f"{filename} does not exist", head)
            data = commit.files[filename]
            headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
            if commit.lfs.get(filename):
                etag = hashlib.sha256(data).hexdigest()
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data)), "ETag": f'"{etag}"'})
            else:
                blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                headers["ETag"] = f'"{blob}"'
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged and not head:
                start = int(ranged.group(1))
                end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start:end + 1], headers, "application/octet-stream")
            self._send(200, data, headers, "application/octet-stream", head=head, length=len(data))

    return Handler


def serve() -> FakeHub:
    """Start a fake Hub on 127.0.0.1 (a free port) in a daemon thread; ``hub.server.shutdown()`` stops it."""
    hub = FakeHub()
    hub.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.server.daemon_threads = True
    threading.Thread(target=hub.server.serve_forever, daemon=True).start()
    return hub
