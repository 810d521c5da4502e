"""The HTTP side of the Gateway (Ray Serve's HTTP proxy, 127.0.0.1:8000 by default): OpenAI-compatible APIs over
the same pipeline and session store as the gRPC API, and the web page.

  POST /v1/chat/completions   Chat Completions (JSON or server-sent events) -> Gateway.chat (gRPC `Chat`)
  GET  /v1/models[/{id}]      the one model
  GET  /v1/realtime           Realtime WebSocket -> LiveSessions (gRPC CreateSession/AppendUnit/Respond/...)
  GET  /  (-> /web/)          the page: microphone and camera into a live session, spoken answers back

Same API keys as gRPC (`Authorization: Bearer <key>`); errors in OpenAI's shape with the HTTP status of their
gRPC status (`errors.py`). The page itself needs no key (it asks for one).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from services.gateway.auth import extract_api_key
from services.gateway.openai.chat_completions import MODEL_ID, Completion, check_model, parse_body, to_chat_request
from services.gateway.openai.errors import openai_error
from services.gateway.openai.media import InvalidParam
from services.gateway.openai.realtime import serve_realtime
from services.gateway.openai.vad import packaged_model
from services.runtime import metrics

STATIC = Path(__file__).parent / "static"


def error_response(exc: BaseException, where: str) -> JSONResponse:
    status, err = openai_error(exc, where)
    return JSONResponse({"error": err}, status_code=status)


def build_http_app(gateway: Any) -> FastAPI:
    """The ASGI app of one Gateway replica (`gateway` has `auth`, `chat`, `live`, `ctx`)."""
    packaged_model()  # the VAD model loads now, not on a connection's event loop
    app = FastAPI(title="MiniCPM-o 2.6 (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    model = {"id": MODEL_ID, "object": "model", "created": started, "owned_by": "openbmb"}

    def authenticate(request: Request) -> str:
        return gateway.auth.authenticate(extract_api_key(request.headers.items()))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        where = "http.chat_completions"
        metrics.REQUESTS.inc(tags={"rpc": where})
        try:
            authenticate(request)
            try:
                body = json.loads(await request.body())
            except ValueError as e:
                raise InvalidParam(f"the body is not JSON ({e})") from None
            chat, fmt = to_chat_request(parse_body(body))
            events = gateway.chat(chat)
            first = await anext(events)  # a bad request fails here, before any status is sent
        except Exception as e:
            return error_response(e, where)
        completion = Completion(fmt)
        if not fmt.stream:
            try:
                return JSONResponse(await completion.whole(_prepend(first, events)))
            except Exception as e:
                return error_response(e, where)
        chunks = _sse(completion.chunks(_prepend(first, events)), where)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authenticate(request)
        except Exception as e:
            return error_response(e, "http.models")
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str, request: Request):
        try:
            authenticate(request)
            check_model(model_id)
        except Exception as e:
            return error_response(e, "http.models")
        return model

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        await serve_realtime(ws, gateway)

    @app.get("/")
    async def index():
        return RedirectResponse("/web/")

    app.mount("/web", StaticFiles(directory=STATIC, html=True), name="web")
    return app


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


async def _sse(chunks: AsyncIterator[dict[str, Any]], where: str) -> AsyncIterator[str]:
    """Server-sent events: `data: {chunk}` lines, then `data: [DONE]`; an error after the first byte can only
    travel in the stream, as one `data: {"error": ...}` line (what OpenAI's clients read as an API error)."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as e:
        _, err = openai_error(e, where)
        yield f"data: {json.dumps({'error': err})}\n\n"
        return
    yield "data: [DONE]\n\n"
