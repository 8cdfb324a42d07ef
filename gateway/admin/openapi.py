"""The OpenAPI 3.1 document of the admin API, served at /api/v1/openapi.json.

Written by hand, next to the handlers it describes (gateway/admin/api.py); the
schemathesis run in tests/admin/test_fuzz.py checks the API against it.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "refused, with a message for the admin",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            }
        }
    },
}


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_TEXT = {"type": "string", "minLength": 1, "maxLength": 320}
_FILTERS = [
    _query("user", "the sending user's address", _TEXT),
    _query("device", "the device id", _TEXT),
    _query("policy", "a policy id the message was held by", _TEXT),
]
_HOLD_ID = {
    "name": "hold_id",
    "in": "path",
    "required": True,
    "description": "a held message's id (32 hex digits)",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_DSN = _query("dsn", "send the sender a delivery status notification", {"type": "boolean"})
_REFUSALS = {"400": _ERROR, "401": _ERROR, "403": _ERROR}
_HELD = {
    "type": "object",
    "required": ["seq", "hold_id", "received_at", "sender", "recipients", "user", "device_id",
                 "policy_ids", "size"],
    "properties": {
        "seq": {"type": "integer"},
        "hold_id": {"type": "string"},
        "received_at": {"type": "string", "format": "date-time"},
        "sender": {"type": "string"},
        "recipients": {"type": "array", "items": {"type": "string"}},
        "user": {"type": "string"},
        "device_id": {"type": "string"},
        "policy_ids": {"type": "array", "items": {"type": "string"}},
        "policy_version": {"type": "string"},
        "size": {"type": "integer"},
        "attempts": {"type": "integer"},
        "last_error": {"type": ["string", "null"]},
        "release_requested": {"type": "boolean"},
        "options": {"type": "array", "items": {"type": "string"}},
        "bounce_of": {"type": ["string", "null"]},
    },
}  # fmt: skip
_ACTION = {
    "type": "object",
    "required": ["action", "count"],
    "properties": {
        "action": {"type": "string", "enum": ["release", "drop"]},
        "count": {"type": "integer"},
        "bounces": {"type": "integer"},
    },
}

_POLICY_ID = {
    "name": "policy_id",
    "in": "path",
    "required": True,
    "description": "a policy id of the set in force",
    "schema": {"type": "string", "minLength": 1, "maxLength": 320},
}
_TERMS = [
    _query(
        "seconds",
        "how long from now (give this or until)",
        {"type": "integer", "minimum": 1, "maximum": 366 * 86400},
    ),
    _query(
        "until",
        "when it ends (ISO 8601 with a UTC offset)",
        {"type": "string", "format": "date-time"},
    ),
    {
        "name": "reason",
        "in": "query",
        "required": True,
        "description": "why (audited)",
        "schema": {"type": "string", "minLength": 1, "maxLength": 500},
    },
]
_OVERRIDES = {
    "type": "object",
    "required": ["overrides"],
    "properties": {
        "overrides": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["policy_id", "kind", "subject", "until", "reason", "actor", "created_at"],
                "properties": {
                    "policy_id": {"type": "string"},
                    "kind": {"type": "string", "enum": ["suspension", "exemption"]},
                    "subject": {"type": ["string", "null"]},
                    "until": {"type": "string", "format": "date-time"},
                    "reason": {"type": "string"},
                    "actor": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
        }
    },
}  # fmt: skip

_VERSION_SCHEMA = {"type": "string", "pattern": "^[0-9a-f]{12}$"}
_VERSION_SUMMARY = {
    "type": "object",
    "required": [
        "seq",
        "version",
        "loaded_at",
        "trigger",
        "loaded_by",
        "last_loaded_at",
        "policy_count",
        "file_count",
        "text_bytes",
        "truncated",
    ],
    "properties": {
        "seq": {"type": "integer"},
        "version": {"type": "string"},
        "loaded_at": {"type": "string", "format": "date-time"},
        "trigger": {"type": "string"},
        "loaded_by": {"type": "string"},
        "last_loaded_at": {"type": "string", "format": "date-time"},
        "policy_count": {"type": "integer"},
        "file_count": {"type": "integer"},
        "text_bytes": {"type": "integer"},
        "truncated": {"type": "boolean"},
        "in_force": {"type": "boolean"},
    },
}
_IDS = {"type": "array", "items": {"type": "string"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Compliance Gateway admin API",
        "version": "1",
        "description": "Held mail, devices and why, policies, impact preview, audit trail "
        "(docs/admin.md). Every operation but this document needs a bearer token; POSTs "
        "also need the X-Gateway-CSRF header from GET /session.",
    },
    "servers": [{"url": "/api/v1"}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/openapi.json": {
            "get": {"summary": "this document", "security": [], "responses": {"200": _ok("OpenAPI 3.1")}}
        },
        "/session": {
            "get": {
                "summary": "who the token is, and the CSRF value for its POSTs",
                "responses": {
                    "200": _ok("the session", {
                        "type": "object", "required": ["name", "role", "csrf"],
                        "properties": {"name": {"type": "string"},
                                       "role": {"type": "string", "enum": ["viewer", "operator"]},
                                       "csrf": {"type": "string"}, "csrf_header": {"type": "string"}},
                    }),
                    **_REFUSALS,
                },
            }
        },
        "/status": {
            "get": {"summary": "readiness, policy version, held mail in brief, upstreams",
                    "responses": {"200": _ok("status (the /status body plus held)"), **_REFUSALS}}
        },
        "/held": {
            "get": {
                "summary": "held messages in arrival order, paged by seq",
                "parameters": [
                    *_FILTERS,
                    _query("after", "the seq to page on from (the previous page's next)",
                           {"type": "integer", "minimum": 0}),
                    _query("limit", "messages per page", {"type": "integer", "minimum": 1, "maximum": 500}),
                ],
                "responses": {
                    "200": _ok("a page", {
                        "type": "object", "required": ["messages", "next"],
                        "properties": {"messages": {"type": "array", "items": _HELD},
                                       "next": {"type": ["integer", "null"]}},
                    }),
                    **_REFUSALS,
                },
            }
        },
        "/held/{action}": {
            "post": {
                "summary": "release or drop every held message of a policy or device (operator)",
                "parameters": [
                    {"name": "action", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ["release", "drop"]}},
                    *_FILTERS,
                    _DSN,
                ],
                "responses": {"200": _ok("done", _ACTION), **_REFUSALS},
            }
        },
        "/held/{hold_id}": {
            "get": {
                "summary": "one held message with its recipients, claims and headers (bounded)",
                "parameters": [_HOLD_ID],
                "responses": {"200": _ok("the message", _HELD), **_REFUSALS, "404": _ERROR},
            }
        },
        "/held/{hold_id}/release": {
            "post": {
                "summary": "release one held message now, whatever its device's state (operator)",
                "parameters": [_HOLD_ID],
                "responses": {"200": _ok("marked for release", _ACTION), **_REFUSALS, "404": _ERROR},
            }
        },
        "/held/{hold_id}/drop": {
            "post": {
                "summary": "drop one held message, with or without a DSN to its sender (operator)",
                "parameters": [_HOLD_ID, _DSN],
                "responses": {"200": _ok("dropped", _ACTION), **_REFUSALS, "404": _ERROR},
            }
        },
        "/devices": {
            "get": {
                "summary": "the device inventory, each with its decision for send and sync and why",
                "parameters": [_FILTERS[0], _FILTERS[1]],
                "responses": {"200": _ok("devices"), **_REFUSALS},
            }
        },
        "/policies": {
            "get": {
                "summary": "the policy set in force, each policy's state and dates; last reload",
                "responses": {"200": _ok("policies"), **_REFUSALS},
            }
        },
        "/policies/history": {
            "get": {
                "summary": "the policy versions put in force, newest first (paged back by seq)",
                "parameters": [
                    _query("limit", "versions per page", {"type": "integer", "minimum": 1, "maximum": 500}),
                    _query("before", "the seq to page back from", {"type": "integer", "minimum": 1}),
                ],
                "responses": {
                    "200": _ok("a page", {
                        "type": "object", "required": ["in_force", "versions", "next"],
                        "properties": {"in_force": {"type": "string"}, "keep": {"type": "integer"},
                                       "versions": {"type": "array", "items": _VERSION_SUMMARY},
                                       "next": {"type": ["integer", "null"]}},
                    }),
                    **_REFUSALS,
                },
            }
        },
        "/policies/history/diff": {
            "get": {
                "summary": "what changed between two stored versions: a unified diff per file, "
                "and the policies added, changed, retracted and removed",
                "parameters": [
                    {"name": "from", "in": "query", "required": True, "schema": _VERSION_SCHEMA,
                     "description": "the older version"},
                    {"name": "to", "in": "query", "required": True, "schema": _VERSION_SCHEMA,
                     "description": "the newer version"},
                ],
                "responses": {
                    "200": _ok("the diff", {
                        "type": "object", "required": ["from", "to", "files", "unchanged_files", "policies"],
                        "properties": {
                            "from": _VERSION_SUMMARY, "to": _VERSION_SUMMARY,
                            "files": {"type": "array", "items": {
                                "type": "object", "required": ["name", "status", "diff", "truncated"],
                                "properties": {"name": {"type": "string"},
                                               "status": {"type": "string", "enum": ["added", "removed", "changed"]},
                                               "diff": {"type": "string"}, "truncated": {"type": "boolean"}}}},
                            "unchanged_files": {"type": "integer"},
                            "policies": {"type": ["object", "null"], "properties": {
                                "added": _IDS, "changed": _IDS, "retracted": _IDS, "removed": _IDS}},
                        },
                    }),
                    **_REFUSALS,
                    "404": _ERROR,
                },
            }
        },
        "/policies/history/{version}": {
            "get": {
                "summary": "one stored version: when and by what it came into force, its files' "
                "text (bounded) and its policies",
                "parameters": [{"name": "version", "in": "path", "required": True,
                                "description": "a policy version (12 hex digits)", "schema": _VERSION_SCHEMA}],
                "responses": {"200": _ok("the version", _VERSION_SUMMARY), **_REFUSALS, "404": _ERROR},
            }
        },
        "/decisions": {
            "get": {
                "summary": "this gateway's submission decisions per action in ten-minute buckets "
                "over the last six hours (since it started)",
                "responses": {"200": _ok("the buckets", {
                    "type": "object", "required": ["bucket_seconds", "buckets"],
                    "properties": {"bucket_seconds": {"type": "integer"}, "buckets": {"type": "array", "items": {
                        "type": "object", "required": ["start", "counts"],
                        "properties": {"start": {"type": "string", "format": "date-time"},
                                       "counts": {"type": "object", "additionalProperties": {"type": "integer"}}}}}},
                }), **_REFUSALS},
            }
        },
        "/impact": {
            "post": {
                "summary": "who a candidate policy file would newly warn, defer, hold, reject or "
                "release, and who it would tell (announcement, withdrawal)",
                "parameters": [
                    _query("mode", "merge: the file's policies replace the live ones of the same "
                           "id; replace: the file alone", {"type": "string", "enum": ["merge", "replace"]}),
                ],
                "requestBody": {
                    "required": True,
                    "content": {"text/plain": {"schema": {"type": "string", "maxLength": 1048576}}},
                },
                "responses": {"200": _ok("the impact report"), **_REFUSALS, "413": _ERROR},
            }
        },
        "/overrides": {
            "get": {
                "summary": "policy suspensions and break-glass exemptions in force",
                "responses": {"200": _ok("overrides", _OVERRIDES), **_REFUSALS},
            }
        },
        "/policies/{policy_id}/suspend": {
            "post": {
                "summary": "suspend a policy for a while: it contributes nothing; held mail it "
                "held goes out (operator)",
                "parameters": [_POLICY_ID, *_TERMS],
                "responses": {"200": _ok("suspended"), **_REFUSALS, "404": _ERROR},
            }
        },
        "/policies/{policy_id}/resume": {
            "post": {
                "summary": "end a policy's suspension now (operator)",
                "parameters": [_POLICY_ID],
                "responses": {"200": _ok("resumed"), **_REFUSALS, "404": _ERROR},
            }
        },
        "/policies/{policy_id}/exemptions": {
            "post": {
                "summary": "break-glass: exempt one user or device from a policy for a while "
                "(operator)",
                "parameters": [_POLICY_ID, _FILTERS[0], _FILTERS[1], *_TERMS],
                "responses": {"200": _ok("exempted"), **_REFUSALS, "404": _ERROR},
            }
        },
        "/audit": {
            "get": {
                "summary": "admin actions, newest first",
                "parameters": [
                    _query("limit", "entries per page", {"type": "integer", "minimum": 1, "maximum": 500}),
                    _query("before", "the seq to page back from", {"type": "integer", "minimum": 1}),
                ],
                "responses": {"200": _ok("entries"), **_REFUSALS},
            }
        },
    },
}  # fmt: skip
