"""specs/openapi.yaml is valid, generated where it can be, and documents every route and code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from openapi_spec_validator import validate

from processor.api.control import ControlApi
from processor.api.views import component_schemas
from processor.security import PanHasher

ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = ROOT / "specs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
METHODS = ("get", "put", "post", "delete", "patch")


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, item[method])
        for path, item in SPEC["paths"].items()
        for method in METHODS
        if method in item
    ]


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_the_document_is_valid_openapi_3_1() -> None:
    assert SPEC["openapi"].startswith("3.1")
    validate(SPEC)


def test_component_schemas_are_generated_from_the_structs() -> None:
    assert SPEC["components"]["schemas"] == component_schemas(), (
        "specs/openapi.yaml is out of date with processor/api/views.py: "
        "run `python -m processor.api.views` and review the diff"
    )


def test_every_route_is_documented_and_every_operation_served() -> None:
    api = ControlApi(None, PanHasher(b"k"))  # type: ignore[arg-type]  # routes only
    served = {(route.method, route.path) for route in api.routes()}
    documented = {(method, path) for method, path, _ in operations()}
    assert served == documented


def test_every_operation_documents_auth_and_its_refusals() -> None:
    for method, path, operation in operations():
        responses = resolve(operation["responses"])
        where = f"{method} {path}"
        # 400 too: every route refuses a query parameter it does not take (invalid_query).
        assert {"400", "401", "503"} <= set(responses), where
        assert operation.get("security", SPEC["security"]) == [{"bearerAuth": []}], where
        parameters = [resolve(p)["name"] for p in operation.get("parameters", [])]
        parameters += [resolve(p)["name"] for p in SPEC["paths"][path].get("parameters", [])]
        for name in re.findall(r"\{([a-z_]+)\}", path):
            assert name in parameters, where
            assert "404" in responses, where
        # A POST that mints a secret cannot be replayed (the secret is never stored): the
        # document says so with x-not-idempotent, and the rest holds for it too.
        if method == "POST" and not operation.get("x-not-idempotent"):
            assert "Idempotency-Key" in parameters, where
        if method == "POST":
            assert {"400", "409", "413"} <= set(responses), where
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= set(responses), where
        if "limit" in parameters:
            assert "400" in responses, where
        success = [code for code in responses if code.startswith("2")]
        assert len(success) == 1, where
        body = resolve(responses[success[0]])["content"]["application/json"]["schema"]
        assert "$ref" in body, where
        for code, response in responses.items():
            if not code.startswith("2"):
                schema = resolve(response)["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (where, code)


def test_every_error_code_the_api_answers_is_documented() -> None:
    text = SPEC_PATH.read_text()
    sources = [
        ROOT / "processor" / "api" / name for name in ("commands.py", "control.py", "http.py")
    ]
    pattern = re.compile(r"(?:Refused|ApiError)\(\s*\d{3},\s*\"([a-z_]+)\"")
    codes = {code for source in sources for code in pattern.findall(source.read_text())}
    assert len(codes) > 10, codes  # the pattern still finds them
    missing = sorted(code for code in codes if f"`{code}`" not in text)
    assert not missing, f"error codes not named in specs/openapi.yaml: {missing}"
