"""A local stand-in for the Hugging Face Hub: the HTTP routes huggingface_hub 1.x uses to push a
model and `from_pretrained` uses to load it, with the real request and response shapes.

Point `HF_ENDPOINT` at `FakeHub.endpoint` (before huggingface_hub is imported: it reads it at
import) and set `HF_HUB_DISABLE_XET=1` (uploads then take the plain LFS path: the batch API and
a PUT per object, instead of Xet storage, which this server does not speak). hf-flower's code
runs unchanged against it. Routes (as in huggingface_hub's `hf_api.py`, `_commit_api.py`,
`lfs.py`, `file_download.py`):

- `GET  /api/whoami-v2`                               the token's user, orgs and role (401 if unknown)
- `POST /api/repos/create`                            403 outside the token's namespaces, 409 if it exists
- `GET  /api/models/{repo}[/revision/{rev}]`          repo info (sha, siblings)
- `GET  /api/models/{repo}/refs`                      branches
- `POST /api/models/{repo}/branch/{branch}`           409 if it exists
- `POST /api/models/{repo}/preupload/{rev}`           upload mode per file (lfs for weights, binaries)
- `POST /{repo}.git/info/lfs/objects/batch`           LFS batch API: an upload action per new object
- `PUT  /lfs-upload/{oid}`                            the object's bytes (sha256 checked)
- `POST /api/models/{repo}/commit/{rev}`              NDJSON commit (header, file, lfsFile, deletedFile)
- `HEAD|GET /{repo}/resolve/{rev}/{path}`             files, with X-Repo-Commit, ETag, X-Linked-Etag/Size
- `POST /api/validate-yaml`                           README.md metadata check before an upload (here:
                                                      the fields and types the Hub's model-card spec
                                                      requires, parsed with huggingface_hub's own code)

Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) like the Hub's, so
huggingface_hub raises the same exception types. `fail_writes = True` makes every branch,
preupload, LFS and commit request answer 503, as a Hub that went down after the token check.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)

REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclasses.dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def git_oid(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclasses.dataclass
class Repo:
    private: bool
    branches: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> commit sha
    commits: dict[str, dict[str, StoredFile]] = dataclasses.field(default_factory=dict)  # sha -> files

    def files(self, revision: str) -> dict[str, StoredFile] | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def commit(self, branch: str, files: dict[str, StoredFile]) -> str:
        sha = secrets.token_hex(20)
        self.commits[sha] = files
        self.branches[branch] = sha
        return sha


class FakeHub:
    """The fake Hub's state and its HTTP server on 127.0.0.1 (a free port), in a daemon thread."""

    def __init__(self, users: dict[str, dict] | None = None):
        # token -> {"name": user, "orgs": [...], "role": "write" | "read"}
        self.users = users or {}
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, user or "")
        self.fail_writes = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_user(self, token: str, name: str, orgs: tuple[str, ...] = (), role: str = "write") -> None:
        self.users[token] = {"name": name, "orgs": list(orgs), "role": role}

    def add_repo(self, repo_id: str, private: bool = False) -> Repo:
        """A repo with an initial commit (.gitattributes) on `main`, as the Hub creates it."""
        repo = Repo(private=private)
        repo.commit("main", {".gitattributes": StoredFile(GITATTRIBUTES, lfs=False)})
        self.repos[repo_id] = repo
        return repo

    def writable(self, user: dict, owner: str) -> bool:
        return user["role"] == "write" and owner in [user["name"], *user["orgs"]]


def _handler_for(hub: FakeHub):
    routes = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", "repo_info"),
        ("GET", rf"/api/models/{REPO}/refs", "refs"),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", "commit"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
        ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    ]
    writes = {"create_branch", "preupload", "lfs_batch", "lfs_upload", "commit"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        # --- plumbing ---------------------------------------------------------------------

        def _dispatch(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            self.user = hub.users.get((self.headers.get("Authorization") or "").removeprefix("Bearer "))
            with hub._lock:
                hub.requests.append((method, path, self.user["name"] if self.user else ""))
            for route_method, pattern, name in routes:
                match = re.fullmatch(pattern, path)
                if route_method == method and match:
                    if name in writes and hub.fail_writes:
                        return self._error(503, "Service Unavailable (fake hub: writes disabled)")
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with hub._lock:
                        return getattr(self, f"_{name}")(**params)
            self._error(404, f"no route {method} {path}")

        def _send(
            self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"
        ):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, payload, status: int = 200, ctype="application/json"):
            self._send(status, json.dumps(payload).encode(), ctype=ctype)

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _repo(self, repo: str, write: bool = False) -> Repo | None:
            found = hub.repos.get(repo)
            if write and self.user is None:
                self._error(401, "Invalid credentials in Authorization header")
                return None
            if found is None or (
                found.private and not (self.user and hub.writable(self.user, repo.split("/")[0]))
            ):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if write and not hub.writable(self.user, repo.split("/")[0]):
                self._error(403, f"You don't have the rights to write to {repo}")
                return None
            return found

        # --- routes -----------------------------------------------------------------------

        def _whoami(self):
            if self.user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            user = self.user
            self._json(
                {
                    "type": "user",
                    "name": user["name"],
                    "fullname": user["name"].title(),
                    "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in user["orgs"]],
                    "auth": {
                        "type": "access_token",
                        "accessToken": {"displayName": "test", "role": user["role"]},
                    },
                }
            )

        def _create_repo(self):
            if self.user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            payload = json.loads(self.body or b"{}")
            owner = payload.get("organization") or self.user["name"]
            repo_id = f"{owner}/{payload['name']}"
            if not hub.writable(self.user, owner):
                return self._error(
                    403, f'You don\'t have the rights to create a model under the namespace "{owner}"'
                )
            if repo_id in hub.repos:
                return self._json(
                    {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"}, 409
                )
            hub.add_repo(
                repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
            )
            self._json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": secrets.token_hex(12)})

        def _repo_info(self, repo, revision="main"):
            found = self._repo(repo)
            if found is None:
                return
            files = found.files(revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            self._json(
                {
                    "_id": secrets.token_hex(12),
                    "id": repo,
                    "modelId": repo,
                    "private": found.private,
                    "sha": found.branches.get(revision, revision),
                    "tags": [],
                    "siblings": [{"rfilename": path} for path in sorted(files)],
                }
            )

        def _refs(self, repo):
            found = self._repo(repo)
            if found is None:
                return
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": sha}
                for n, sha in found.branches.items()
            ]
            self._json({"branches": branches, "converts": [], "tags": []})

        def _create_branch(self, repo, branch):
            found = self._repo(repo, write=True)
            if found is None:
                return
            if branch in found.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            start = json.loads(self.body or b"{}").get("startingPoint") or "main"
            files = found.files(start)
            if files is None:
                return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
            found.branches[branch] = found.branches.get(start, start)
            self._json({})

        def _preupload(self, repo, revision):
            found = self._repo(repo, write=True)
            if found is None:
                return
            if found.files(revision) is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = json.loads(self.body)["files"]
            self._json(
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs"
                            if _is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
                            else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ],
                    "commitOid": found.branches.get(revision, revision),
                }
            )

        def _lfs_batch(self, repo):
            if self._repo(repo, write=True) is None:
                return
            payload = json.loads(self.body)
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs_objects:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}", "header": {}}
                    }
                objects.append(entry)
            self._json({"transfer": "basic", "objects": objects}, ctype="application/vnd.git-lfs+json")

        def _lfs_upload(self, oid):
            if hashlib.sha256(self.body).hexdigest() != oid:
                return self._error(400, "sha256 of the uploaded content does not match its oid")
            hub.lfs_objects[oid] = self.body
            self._send(200)

        def _commit(self, repo, revision):
            found = self._repo(repo, write=True)
            if found is None:
                return
            files = found.files(revision)
            if files is None or revision not in found.branches:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = dict(files)
            for line in self.body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        return self._error(400, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = StoredFile(hub.lfs_objects[value["oid"]], lfs=True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
            sha = found.commit(revision, files)
            self._json(
                {"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "success": True}
            )

        def _validate_yaml(self):
            errors = metadata_errors(json.loads(self.body)["content"])
            self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)

        def _resolve(self, repo, revision, path):
            found = self._repo(repo)
            if found is None:
                return
            files = found.files(revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            stored = files.get(path)
            if stored is None:
                return self._error(404, f"Entry not found: {path}", "EntryNotFound")
            headers = {"X-Repo-Commit": found.branches.get(revision, revision), "ETag": f'"{stored.git_oid}"'}
            if stored.lfs:
                headers.update(
                    {"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.data))}
                )
            self._send(200, stored.data, headers, ctype="application/octet-stream")

    return Handler


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    """As the Hub decides: weight files and other binaries go through LFS, small text does not."""
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


# Values of `pipeline_tag` this check knows (a subset of the Hub's list, enough for these tests).
PIPELINE_TAGS = {
    "text-classification",
    "token-classification",
    "text-generation",
    "fill-mask",
    "feature-extraction",
}


def metadata_errors(readme: str) -> list[str]:
    """What the Hub would reject in a README's YAML metadata (the fields model cards here use)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    try:
        data = ModelCard(readme, ignore_metadata_errors=False).data.to_dict()
    except Exception as err:  # noqa: BLE001 - any parse failure is a validation error
        return [f"invalid YAML metadata: {err}"]
    errors = []
    for key in ("tags", "datasets"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be a list of strings')
    for key in ("license", "library_name", "base_model"):
        if data.get(key) is not None and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    if data.get("pipeline_tag") is not None and data["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" {data["pipeline_tag"]!r} is not a known pipeline')
    if "model-index" in data:
        try:
            model_index_to_eval_results(data["model-index"])
        except Exception as err:  # noqa: BLE001
            errors.append(f'"model-index" is malformed: {err}')
    return errors
