"""FakeGrafana: a FAKE of the few Grafana HTTP API endpoints `tensorfleet dashboards push`
uses, for tests on machines without a Grafana server. It is not Grafana: it keeps state in
dicts, checks nothing of the dashboard model, and copies only the behaviour the push relies
on from Grafana's documented API:

- auth: basic (user/password) or `Authorization: Bearer <token>`, else 401; a viewer token
  gets 403 on every write
- folders: GET /api/folders/{uid}, POST /api/folders
- datasources: GET /api/datasources, GET|PUT /api/datasources/uid/{uid}, POST /api/datasources
  (409 when the name is taken)
- dashboards: POST /api/dashboards/db (a new uid gets version 1, a save bumps the version;
  without `overwrite` a version that differs from the stored one is 412 version-mismatch
  and a title taken by another uid in the folder is 412 name-exists),
  GET /api/dashboards/uid/{uid}, GET /api/search

Runs on 127.0.0.1 on a free port in a background thread: `with FakeGrafana() as g: g.url`.
"""

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class FakeGrafana:
    def __init__(self, user: str = "admin", password: str = "admin", token: str = "editor-token",
                 viewer_token: str = "viewer-token"):
        self.basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.token, self.viewer_token = token, viewer_token
        self.folders: dict[str, dict] = {}
        self.datasources: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard" (with its "version"), "folderUid"}
        self.requests: list[tuple[str, str]] = []  # (method, path), for assertions
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeGrafana":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the API: (status, body) for a request that passed auth ---------------------------

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, object]:
        if m := re.fullmatch(r"/api/folders/([\w-]+)", path):
            folder = self.folders.get(m[1])
            return (200, folder) if method == "GET" and folder else (404, {"message": "folder not found"})
        if path == "/api/folders" and method == "POST":
            if body["uid"] in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            self.folders[body["uid"]] = {"id": len(self.folders) + 1, "uid": body["uid"], "title": body["title"]}
            return 200, self.folders[body["uid"]]
        if path == "/api/datasources":
            return self._create_datasource(body) if method == "POST" else (200, list(self.datasources.values()))
        if m := re.fullmatch(r"/api/datasources/uid/([\w-]+)", path):
            return self._datasource_by_uid(method, m[1], body)
        if path == "/api/dashboards/db" and method == "POST":
            return self._save_dashboard(body)
        if m := re.fullmatch(r"/api/dashboards/uid/([\w-]+)", path):
            saved = self.dashboards.get(m[1])
            if not saved:
                return 404, {"message": "Dashboard not found"}
            return 200, {"dashboard": saved["dashboard"], "meta": {"folderUid": saved["folderUid"]}}
        if path == "/api/search":
            return 200, [{"uid": uid, "title": d["dashboard"]["title"], "type": "dash-db", "folderUid": d["folderUid"]}
                         for uid, d in self.dashboards.items()]
        return 404, {"message": "Not found"}

    def _create_datasource(self, body: dict) -> tuple[int, object]:
        if any(ds["name"] == body["name"] for ds in self.datasources.values()) or body["uid"] in self.datasources:
            return 409, {"message": "data source with the same name already exists"}
        ds = {**body, "id": len(self.datasources) + 1, "version": 1}
        self.datasources[body["uid"]] = ds
        return 200, {"datasource": ds, "id": ds["id"], "message": "Datasource added", "name": ds["name"]}

    def _datasource_by_uid(self, method: str, uid: str, body: dict | None) -> tuple[int, object]:
        ds = self.datasources.get(uid)
        if not ds:
            return 404, {"message": "Data source not found"}
        if method == "PUT":
            ds = self.datasources[uid] = {**body, "uid": uid, "id": ds["id"], "version": ds["version"] + 1}
            return 200, {"datasource": ds, "id": ds["id"], "message": "Datasource updated", "name": ds["name"]}
        return 200, ds

    def _save_dashboard(self, body: dict) -> tuple[int, object]:
        dashboard, folder, overwrite = body["dashboard"], body.get("folderUid", ""), body.get("overwrite", False)
        uid = dashboard["uid"]
        if folder and folder not in self.folders:
            return 400, {"message": "folder not found"}
        same_title = [u for u, d in self.dashboards.items()
                      if u != uid and d["folderUid"] == folder and d["dashboard"]["title"] == dashboard["title"]]
        if same_title and not overwrite:
            return 412, {"message": "A dashboard with the same name in the folder already exists", "status": "name-exists"}
        existing = self.dashboards.get(uid)
        if existing and dashboard.get("version") != existing["dashboard"]["version"] and not overwrite:
            return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
        version = existing["dashboard"]["version"] + 1 if existing else 1
        self.dashboards[uid] = {"dashboard": {**dashboard, "version": version}, "folderUid": folder}
        return 200, {"id": list(self.dashboards).index(uid) + 1, "uid": uid, "status": "success",
                     "url": f"/d/{uid}/{dashboard['title'].lower()}", "version": version, "slug": dashboard["title"].lower()}

    def role(self, authorization: str | None) -> str | None:
        if authorization in (self.basic, f"Bearer {self.token}"):
            return "editor"
        if authorization == f"Bearer {self.viewer_token}":
            return "viewer"
        return None


def _handler(grafana: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            path = urlparse(self.path).path
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            grafana.requests.append((self.command, path))
            role = grafana.role(self.headers.get("Authorization"))
            if role is None:
                status, answer = 401, {"message": "Unauthorized"}
            elif role == "viewer" and self.command != "GET":
                status, answer = 403, {"message": "Permission denied"}
            else:
                status, answer = grafana.handle(self.command, path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    return Handler
