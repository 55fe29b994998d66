"""The HTTP side of `multimodal serve`: a FastAPI application over an `Engine` (docs/serve.md lists the API).

    GET  /                      the page (page.html)
    GET  /api/info              the model, the rows, the targets, the limits
    GET  /api/search?q=TEXT     search by text     (&k=8&target=images|texts)
    GET  /api/search?row=N      search by a row of the target, its own vector
    POST /api/search            search by an image: the body is the image, or a form with the field `image`
    GET  /api/thumbnail/N       a JPEG thumbnail of image row N

Every answer that is not a result is a 4xx with {"error": "one sentence."}: parameters are read by this module,
not by FastAPI's validation, whose errors are lists; uploads are refused by their declared length before they are
read, and decoded under the decoder's pixel limit (`data.decode`), a few at a time. With a token, every request
but the page itself (a static file holding nothing of the index) carries `Authorization: Bearer TOKEN`.
"""

import asyncio
import hmac
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from multimodal.data.decode import MAX_IMAGE_PIXELS, decode_file, image_header
from multimodal.data.faults import BadSample
from multimodal.serve.batching import MicroBatcher
from multimodal.serve.engine import TARGETS, Engine, Found, Query
from multimodal.serve.thumbnails import Thumbnails, Unavailable

PAGE = Path(__file__).with_name("page.html")
MAX_K = 200
MAX_QUERY_CHARS = 1000
DECODING = 2  # uploads decoded at a time: each may take up to 3 x MAX_IMAGE_PIXELS bytes
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                               "style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                               "connect-src 'self'; frame-ancestors 'none'"}
STATUS_SENTENCES = {404: "There is no such page or API route: the page is /, the API /api/info and /api/search.",
                    405: "This route does not take that method: see /api/info and docs/serve.md.",
                    400: "The request cannot be read.", 413: "The request is too large."}


class ApiError(Exception):
    def __init__(self, status: int, sentence: str):
        super().__init__(sentence)
        self.status, self.sentence = status, sentence


def error(status: int, sentence: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": sentence}, status, headers=headers)


class BearerToken:
    """ASGI middleware: each request but GET / carries `Authorization: Bearer TOKEN` (compared in constant
    time), else 401."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not (scope["path"] == "/" and scope["method"] in ("GET", "HEAD")):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                sentence = ("This server needs its token: send the header 'Authorization: Bearer TOKEN', or open "
                            "the page as /#token=TOKEN.")
                await error(401, sentence, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, thumbnails: Thumbnails | None = None, token: str | None = None,
               max_upload: int = 16 << 20, max_batch: int = 64) -> "FastAPI | BearerToken":
    """The application serving `engine`'s searches and `thumbnails` (None: no thumbnails); `token`: the bearer
    token every request needs; `max_upload`: the largest image upload, in bytes; `max_batch`: the most queries
    encoded in one batch."""
    batcher = MicroBatcher(engine.run, max_batch)
    decoding = asyncio.Semaphore(DECODING)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="multimodal serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    page = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.sentence)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, STATUS_SENTENCES.get(exc.status_code, "The request cannot be answered."))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error(400, "The request's parameters cannot be read: see docs/serve.md for the API.")

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):  # a bug: Starlette logs its traceback on the server
        return error(500, "The server failed on this request (a bug: its log has the details).")

    @app.get("/", response_class=HTMLResponse)
    async def index_page():
        return HTMLResponse(page, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @app.get("/api/info")
    async def info():
        return {"model": engine.info.get("model"), "pretrained": engine.info.get("pretrained"),
                "checkpoint": engine.info.get("checkpoint"), "index": engine.index.name,
                "targets": {name: {"count": t.count, "search": t.how} for name, t in engine.targets.items()},
                "default_target": engine.default_target, "dim": next(iter(engine.targets.values())).dim,
                "thumbnails": bool(thumbnails), "max_k": MAX_K, "max_upload_bytes": max_upload,
                "max_query_chars": MAX_QUERY_CHARS, "batches": engine.batches, "queries": engine.queries}

    @app.get("/api/search")
    async def search_get(request: Request):
        params = _params(request, ("q", "row", "k", "target"))
        target, k = _target(engine, params), _k(params)
        if ("q" in params) == ("row" in params):
            raise ApiError(400, "Pass one query: q=TEXT, or row=N (or POST an image).")
        if "q" in params:
            text = params["q"].strip()
            if not text:
                raise ApiError(400, "The query q is empty: type some words.")
            if len(text) > MAX_QUERY_CHARS:
                raise ApiError(400, f"The query q is {len(text)} characters, over the limit of {MAX_QUERY_CHARS}.")
            return await answer(Query("text", text, target, k), {"text": text})
        row = _row(params["row"], engine.targets[target].count, target)
        meta = engine.targets[target].meta(row)
        about = {name: value for name, value in describe(Found(row, 1.0, meta), target).items() if name != "score"}
        return await answer(Query("row", row, target, k), about)

    @app.post("/api/search")
    async def search_post(request: Request):
        params = _params(request, ("k", "target"))
        target, k = _target(engine, params), _k(params)
        data = await _upload(request, max_upload)
        async with decoding:
            image = await run_in_threadpool(_decode, data, engine.transform.decode_side)
        return await answer(Query("image", image, target, k), {"image": "upload"})

    @app.get("/api/thumbnail/{row}")
    def thumbnail(row: str):
        if thumbnails is None or "images" not in engine.targets:
            raise ApiError(404, "This index has no thumbnails: it holds no local images.")
        number = _row(row, engine.targets["images"].count, "images")
        try:
            jpeg = thumbnails.jpeg(number, engine.targets["images"].meta(number))
        except Unavailable as exc:
            raise ApiError(404, str(exc)) from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600",
                                                                 "X-Content-Type-Options": "nosniff"})

    async def answer(query: Query, about: dict) -> JSONResponse:
        start = time.perf_counter()
        found = await batcher.submit(query)
        return JSONResponse({"query": about, "target": query.target, "k": query.k,  # plain JSON: no re-validation
                             "results": [{"rank": rank, **describe(hit, query.target)}
                                         for rank, hit in enumerate(found, 1)],
                             "took_ms": round((time.perf_counter() - start) * 1000, 2)})

    def describe(hit: Found, target: str) -> dict:
        meta = hit.meta
        out = {"row": hit.row, "score": round(float(hit.score), 5), "key": str(meta.get("key", "")),
               "caption": str(meta.get("caption", ""))}
        source = meta.get("file_name") or (f"{meta['url']}#{meta.get('key', '')}" if "url" in meta else None)
        if source:
            out["source"] = str(source)
        if target == "images" and thumbnails is not None and thumbnails.has(meta):
            out["thumbnail"] = f"/api/thumbnail/{hit.row}"
        return out

    return BearerToken(app, token) if token else app


def _params(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once and each one of `allowed`."""
    found: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise ApiError(400, f"Unknown parameter {name[:40]!r}: this route takes {', '.join(allowed)}.")
        if name in found:
            raise ApiError(400, f"The parameter {name} is given twice: give it once.")
        found[name] = value
    return found


def _k(params: dict) -> int:
    value = params.get("k", "8")
    if not re.fullmatch(r"[0-9]{1,6}", value) or not 1 <= int(value) <= MAX_K:
        raise ApiError(400, f"k must be a whole number from 1 to {MAX_K}, got {value[:40]!r}.")
    return int(value)


def _target(engine: Engine, params: dict) -> str:
    target = params.get("target", engine.default_target)
    if target not in TARGETS:
        raise ApiError(400, f"target must be images or texts, got {target[:40]!r}.")
    if target not in engine.targets:
        raise ApiError(400, f"This index holds no {target}: search target={engine.default_target}.")
    return target


def _row(value: str, count: int, target: str) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", value) or int(value) >= count:
        raise ApiError(404 if re.fullmatch(r"[0-9]+", value) else 400,
                       f"row must be a row of the {target}, a whole number from 0 to {count - 1}, got {value[:40]!r}.")
    return int(value)


async def _upload(request: Request, most: int) -> bytes:
    """The image bytes of an upload: the body itself, or the form field `image` of a multipart form; refused by
    its declared length before it is read."""
    length = request.headers.get("content-length")
    if length is None or not re.fullmatch(r"[0-9]{1,18}", length):
        raise ApiError(411, "Send the image with a Content-Length header, as a browser or curl does.")
    if int(length) > most:
        raise ApiError(413, f"The upload is {int(length)} bytes, over this server's limit of {most} "
                            "(serve --max_upload_mb).")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > most:
                raise ApiError(413, f"The upload is over this server's limit of {most} bytes (serve --max_upload_mb).")
    except ClientDisconnect:
        raise ApiError(400, "The upload ended before its declared length.") from None
    body = bytes(body)
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        body = await _form_image(request, body, most)
    if not body:
        raise ApiError(400, "The upload is empty: send a JPEG, PNG or WebP image.")
    return body


async def _form_image(request: Request, body: bytes, most: int) -> bytes:
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=most)
    except Exception as exc:  # python-multipart's and Starlette's parsers raise what they like on a crafted form
        detail = getattr(exc, "detail", None) or type(exc).__name__
        raise ApiError(400, f"The form cannot be read ({str(detail)[:80]}): send the image as its field 'image'.") \
            from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "The form has no file field 'image': send the image as its field 'image'.")
    return await upload.read()


def _decode(data: bytes, min_side: int):
    """An uploaded image, decoded as `embed` decodes images (the same size guards); or ApiError."""
    header = image_header(data)
    if header is None:
        raise ApiError(415, "The upload is not an image that can be read: send a JPEG, PNG or WebP image.")
    (width, height), _ = header
    if width * height > MAX_IMAGE_PIXELS:
        raise ApiError(413, f"The image declares {width} x {height} pixels, over the limit of {MAX_IMAGE_PIXELS}: "
                            "send a smaller one.")
    try:
        return decode_file(data, min_side=min_side)
    except BadSample as bad:
        raise ApiError(415, f"The upload cannot be decoded as an image ({bad.kind}): send a JPEG, PNG or WebP "
                            "image.") from None
