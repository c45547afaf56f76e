"""The Postman collection (postman/): newman runs it against `python serve.py`, the README's run command, and
every check in it passes, on a fresh server and again on the same server; its requests reach every HTTP
route of the app; the environment file carries no token.

Then the OpenAPI document as a Postman user imports it: Postman's own converter (openapi-to-postmanv2, with
the import options "parameters generated from examples" and optional parameters off) makes a collection of
/openapi.json; with only `baseUrl` and `bearerToken` set, newman sends every request as generated, and every
one that needs no id from an earlier answer succeeds.

newman and the converter are found through $NEWMAN / $OPENAPI2POSTMANV2, then PATH, then
.ci/tools/node_modules/.bin, where CI installs them (`npm install --prefix .ci/tools newman@6
openapi-to-postmanv2@6`; the folder is git-ignored). Without them those tests skip, except under CI, where they
fail.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import httpx2
import pytest
from starlette.routing import Route

from auth import JWTSettings
from conftest import REPO, TEST_SECRET, config_for, require, tool
from main import create_app

COLLECTION = REPO / "postman" / "gainz.postman_collection.json"
ENVIRONMENT = REPO / "postman" / "gainz.postman_environment.json"
LOCAL_TOOLS = REPO / ".ci" / "tools" / "node_modules" / ".bin"
NEWMAN_SECONDS = 300
# Postman's import dialog: "Parameter generation: Example", "Enable optional parameters: off".
IMPORT_OPTIONS = "parametersResolution=Example,enableOptionalParameters=false"
# The imported requests that need an id from an earlier answer: the example ids name no thread or run (404).
NEED_AN_ID = {("GET", "/threads/{thread_id}"), ("PATCH", "/threads/{thread_id}"), ("DELETE", "/threads/{thread_id}"),
              ("GET", "/threads/{thread_id}/messages"), ("POST", "/threads/{thread_id}/messages"),
              ("POST", "/threads/{thread_id}/runs"), ("POST", "/threads/{thread_id}/runs/{run_id}/cancel"),
              ("GET", "/threads/{thread_id}/events"), ("GET", "/threads/{thread_id}/presence"),
              ("POST", "/threads/{thread_id}/runs/{run_id}/tool_outputs")}

pytestmark = pytest.mark.anyio


def node_tool(name: str) -> str | None:
    if os.environ.get(name.upper()):
        return os.environ[name.upper()]
    return tool(name) or (str(LOCAL_TOOLS / name) if (LOCAL_TOOLS / name).exists() else None)


def newman() -> str | None:
    return node_tool("newman")


@pytest.fixture
def routes(tmp_path) -> list[Route]:
    app = create_app(config_for(tmp_path), JWTSettings(secret=TEST_SECRET))
    return [route for route in app.routes if isinstance(route, Route)]


def route_set(routes: list[Route]) -> set[tuple[str, str]]:
    return {(method, route.path) for route in routes for method in route.methods - {"HEAD"}}


def route_of(routes: list[Route], method: str, path: str) -> tuple[str, str] | None:
    for route in routes:
        if method in route.methods and route.path_regex.match(path):
            return method, route.path
    return None


def run_newman(url: str, report: Path) -> dict:
    """One run of the whole collection; the JSON report, with the CLI output to explain a failure."""
    jwt = JWTSettings(secret=TEST_SECRET)
    return newman_report([str(COLLECTION), "-e", str(ENVIRONMENT), "--env-var", f"base_url={url}",
                          "--env-var", f"token_alice={jwt.mint('alice')}", "--env-var", f"token_bob={jwt.mint('bob')}"],
                         report)


def newman_report(arguments: list[str], report: Path) -> dict:
    command = [newman(), "run", *arguments, "--reporters", "cli,json", "--reporter-json-export", str(report),
               "--color", "off"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=NEWMAN_SECONDS, cwd=REPO)
    assert report.exists(), f"newman wrote no report (exit {finished.returncode}):\n{finished.stdout}{finished.stderr}"
    result = json.loads(report.read_text())
    result["cli"] = finished.stdout[-20000:] + finished.stderr
    result["exit_code"] = finished.returncode
    return result


def failures(result: dict) -> list[str]:
    return [f"{failure['source']['name']}: {failure['error'].get('test', '')} {failure['error']['message']}"
            for failure in result["run"]["failures"]]


def assert_passed(result: dict) -> None:
    failed = failures(result)
    assert not failed, "\n".join(failed) + "\n\nnewman's output:\n" + result["cli"]
    stats = result["run"]["stats"]
    for kind in ("requests", "assertions", "testScripts", "prerequestScripts"):
        assert stats[kind]["failed"] == 0, (kind, result["cli"])
    assert stats["assertions"]["total"] > 0
    assert result["exit_code"] == 0, result["cli"]


def exercised(result: dict, routes: list[Route]) -> set:
    """The routes the run's requests reached (a request that matches no route: its method and path)."""
    reached = set()
    for execution in result["run"]["executions"]:
        method, path = execution["request"]["method"], "/" + "/".join(execution["request"]["url"]["path"])
        reached.add(route_of(routes, method, path) or (method, path))
    return reached


async def test_the_collection_passes_on_a_fresh_server_then_again_on_the_same_one(servers, routes, tmp_path):
    require(newman() is not None, "newman (npm install newman)")
    server = await servers()
    first = run_newman(server.url, tmp_path / "first.json")
    assert_passed(first)
    assert exercised(first, routes) == route_set(routes)
    second = run_newman(server.url, tmp_path / "second.json")  # the names made by the first run exist no more
    assert_passed(second)
    assert second["run"]["stats"]["assertions"]["total"] == first["run"]["stats"]["assertions"]["total"]


async def test_the_openapi_document_imported_as_postman_does_sends_every_request_that_needs_no_id(servers, routes,
                                                                                                 tmp_path):
    converter = node_tool("openapi2postmanv2")
    require(converter is not None, "openapi-to-postmanv2 (npm install openapi-to-postmanv2)")
    require(newman() is not None, "newman (npm install newman)")
    server = await servers()
    document, imported = tmp_path / "openapi.json", tmp_path / "imported.postman_collection.json"
    async with httpx2.AsyncClient() as http:
        document.write_bytes((await http.get(server.url + "/openapi.json")).content)
    subprocess.run([converter, "-s", str(document), "-o", str(imported), "-O", IMPORT_OPTIONS], check=True,
                   capture_output=True, timeout=NEWMAN_SECONDS, cwd=tmp_path)
    collection = json.loads(imported.read_text())
    # The document names its server (the one asked), and an example for every id and body: nothing to fill in.
    assert {variable["key"]: variable["value"] for variable in collection["variable"]} == {"baseUrl": server.url}
    generated = [item["request"] for item in requests_of(collection["item"])]
    assert not [request for request in generated if re.search(r'<\w+>|"string"|\bstring\b', json.dumps(
        [request["url"].get("variable"), request["url"].get("query"), request.get("body")]))]
    token = JWTSettings(secret=TEST_SECRET).mint("alice")
    result = newman_report([str(imported), "--env-var", f"baseUrl={server.url}", "--env-var", f"bearerToken={token}"],
                           tmp_path / "imported.json")
    answers = {}
    for execution in result["run"]["executions"]:
        method, path = execution["request"]["method"], "/" + "/".join(execution["request"]["url"]["path"])
        answers[route_of(routes, method, path) or (method, path)] = execution["response"]["code"]
    assert set(answers) == route_set(routes), result["cli"]
    assert {route: code for route, code in answers.items() if route not in NEED_AN_ID and code >= 400} == {}, \
        result["cli"]
    assert {route: code for route, code in answers.items() if route in NEED_AN_ID} == dict.fromkeys(NEED_AN_ID, 404)


# ---------------------------------------------------------------- the files themselves (no newman needed)

def requests_of(items: list) -> list[dict]:
    found = []
    for item in items:
        found += requests_of(item["item"]) if "item" in item else [item]
    return found


def test_the_collection_is_a_v2_1_collection_in_the_walkthrough_folders():
    collection = json.loads(COLLECTION.read_text())
    assert collection["info"]["schema"] == "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
    assert "python auth.py" in collection["info"]["description"]
    assert [folder["name"] for folder in collection["item"]] == [
        "Health & docs", "Assistants", "Threads", "Messages & runs", "Live events", "Errors", "Clean-up"]


def test_every_request_of_the_collection_checks_its_answer():
    for item in requests_of(json.loads(COLLECTION.read_text())["item"]):
        tests = [event for event in item.get("event", []) if event["listen"] == "test"]
        assert tests, item["name"]
        script = "\n".join(tests[0]["script"]["exec"])
        assert "pm.test(" in script, item["name"]
        assert "pm.response.to.have.status(" in script or "pm.response.code" in script, item["name"]


def test_the_collections_requests_name_every_route(routes):
    named = set()
    for item in requests_of(json.loads(COLLECTION.read_text())["item"]):
        path = "/" + "/".join(item["request"]["url"]["path"])
        named.add(route_of(routes, item["request"]["method"], path) or (item["request"]["method"], path))
    assert named == route_set(routes)


def test_the_environment_points_at_a_local_server_and_holds_no_token():
    values = {entry["key"]: entry["value"] for entry in json.loads(ENVIRONMENT.read_text())["values"]}
    assert values == {"base_url": "http://127.0.0.1:8000", "token_alice": "", "token_bob": ""}
