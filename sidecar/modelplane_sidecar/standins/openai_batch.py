"""A local stand-in for OpenAI's Files and Batch APIs (`/v1/files`, `/v1/batches`), for tests.

It speaks the wire format the `openai` SDK expects: multipart uploads, `file` / `batch` objects,
cursor-paged lists, raw file content, deletes and cancels, and OpenAI's error bodies. Every
object it returns is checked against the SDK's own models (`FileObject`, `Batch`) and a batch's
create body against the SDK's `BatchCreateParams`, so a wrong field fails a test. A batch runs
at once: each JSONL line of its input file gets a canned `chat.completion` (or an error line for
a malformed request), written to an output file, and the batch is `completed`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import BodyPartReader, web
from openai.types import Batch, FileDeleted, FileObject
from openai.types.batch_create_params import BatchCreateParams

from .conformance import problems
from .scripted import json_error


@dataclass
class Upload:
    """What arrived for one file upload (for tests to check the relay)."""

    filename: str
    purpose: str
    size: int
    sha256: str
    #: The request's Content-Length (None: it came chunked).
    content_length: int | None
    authorization: str | None


@dataclass
class OpenAIBatchStandIn:
    api_key: str | None = None
    reply: str = "A canned batch answer."
    files: dict[str, tuple[dict[str, Any], bytes]] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)
    #: (method, path with query, authorization header) of every call.
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)
    _serial: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3, middlewares=[self._auth])
        app.router.add_post("/v1/files", self._create_file)
        app.router.add_get("/v1/files", self._list_files)
        app.router.add_get("/v1/files/{file_id}", self._retrieve_file)
        app.router.add_delete("/v1/files/{file_id}", self._delete_file)
        app.router.add_get("/v1/files/{file_id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._create_batch)
        app.router.add_get("/v1/batches", self._list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self._retrieve_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._cancel_batch)
        return app

    def _id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-standin{self._serial:04d}"

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("authorization")
        self.calls.append((request.method, request.path_qs, given))
        if self.api_key is not None and given != f"Bearer {self.api_key}":
            shown = (given or "").removeprefix("Bearer ")
            raise _error(
                401,
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_api_key",
            )
        response: web.StreamResponse = await handler(request)
        return response

    # -- files ----------------------------------------------------------------------------------

    async def _create_file(self, request: web.Request) -> web.Response:
        length = request.content_length
        reader = await request.multipart()
        purpose: str | None = None
        filename = "upload"
        content = bytearray()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = part.filename or filename
                while chunk := await part.read_chunk(64 * 1024):
                    content += chunk
        if purpose is None:
            raise _error(400, "Missing required parameter: 'purpose'.", None, "purpose")
        if not content:
            raise _error(400, "Missing required parameter: 'file'.", None, "file")
        data = bytes(content)
        self.uploads.append(
            Upload(
                filename,
                purpose,
                len(data),
                hashlib.sha256(data).hexdigest(),
                length,
                request.headers.get("authorization"),
            )
        )
        obj = self._store_file(filename, purpose, data)
        return _json(obj)

    def _store_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = self._id("file")
        obj: dict[str, Any] = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        FileObject.model_validate(obj)
        self.files[file_id] = (obj, data)
        return obj

    def _file(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        file_id = request.match_info["file_id"]
        found = self.files.get(file_id)
        if found is None:
            raise _error(404, f"No such File object: {file_id}", None, "id")
        return found

    async def _list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        data = [obj for obj, _ in self.files.values() if purpose in (None, obj["purpose"])]
        return _json(_page(data))

    async def _retrieve_file(self, request: web.Request) -> web.Response:
        return _json(self._file(request)[0])

    async def _delete_file(self, request: web.Request) -> web.Response:
        obj, _ = self._file(request)
        del self.files[obj["id"]]
        deleted = {"id": obj["id"], "object": "file", "deleted": True}
        FileDeleted.model_validate(deleted)
        return _json(deleted)

    async def _file_content(self, request: web.Request) -> web.Response:
        _, data = self._file(request)
        return web.Response(body=data, content_type="application/octet-stream")

    # -- batches --------------------------------------------------------------------------------

    async def _create_batch(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise _error(400, "We could not parse the JSON body of your request.") from None
        wrong = problems(body, BatchCreateParams)
        if wrong:
            raise _error(400, "Invalid request: " + "; ".join(wrong))
        found = self.files.get(body["input_file_id"])
        if found is None:
            raise _error(400, f"No such File object: {body['input_file_id']}", None, "input_file")
        if found[0]["purpose"] != "batch":
            raise _error(400, "The input file must have purpose 'batch'.", None, "input_file_id")
        now = int(time.time())
        lines, completed, failed = self._run(found[1], body["endpoint"])
        output = self._store_file("batch_output.jsonl", "batch_output", b"".join(lines))
        batch = {
            "id": self._id("batch"),
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": body["completion_window"],
            "status": "completed",
            "output_file_id": output["id"],
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": now,
            "expires_at": now + 86400,
            "finalizing_at": now,
            "completed_at": now,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {
                "total": completed + failed,
                "completed": completed,
                "failed": failed,
            },
            "metadata": body.get("metadata"),
        }
        Batch.model_validate(batch)
        self.batches[batch["id"]] = batch
        return _json(batch)

    def _run(self, data: bytes, endpoint: str) -> tuple[list[bytes], int, int]:
        lines: list[bytes] = []
        completed = failed = 0
        for raw in data.splitlines():
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
                custom_id = str(item["custom_id"])
                model = str(item["body"]["model"])
                if item.get("url") != endpoint:
                    raise ValueError(item.get("url"))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                failed += 1
                error = {"code": "invalid_request", "message": "This line is not a valid request."}
                lines.append(orjson.dumps({"id": self._id("batch_req"), "error": error}) + b"\n")
                continue
            completed += 1
            answer = {
                "id": self._id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.reply, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            }
            line = {
                "id": self._id("batch_req"),
                "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": self._id("req"), "body": answer},
                "error": None,
            }
            lines.append(orjson.dumps(line) + b"\n")
        return lines, completed, failed

    def _batch(self, request: web.Request) -> dict[str, Any]:
        batch_id = request.match_info["batch_id"]
        found = self.batches.get(batch_id)
        if found is None:
            raise _error(404, f"No batch found with id '{batch_id}'.", None, "id")
        return found

    async def _list_batches(self, request: web.Request) -> web.Response:
        return _json(_page(list(self.batches.values())))

    async def _retrieve_batch(self, request: web.Request) -> web.Response:
        return _json(self._batch(request))

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        elif batch["status"] != "cancelled":
            raise _error(
                409, f"Cannot cancel a batch with status '{batch['status']}'.", None, "status"
            )
        return _json(batch)


def _page(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": False,
    }


def _json(data: object) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> web.HTTPException:
    kind = "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json_error(status, body)
