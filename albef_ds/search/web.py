"""The search page and its JSON API, on FastAPI (typed, validated requests; an OpenAPI schema at
/openapi.json; served by uvicorn). Every answer is JSON; an error is a 4xx status with
{"detail": "<one line>"} and the server goes on answering.

    GET  /                          the page (one HTML file, no outside assets)
    GET  /api/info                  the indexes (name, images, captions, usable or why not), VQA on/off, limits
    POST /api/search                {"text", "k"?, "rerank"?, "index"?} -> {"hits": [...], "reranked", "timings"}
    GET  /api/images/{index}/{row}  an indexed image's bytes
    POST /api/heatmap               {"text", "row", "index"?} -> {"panels": [{"word", "image": PNG data URL}]}
    POST /api/answer                form: image (file), question, top? -> {"answers": [{"answer", "probability"}]}
    POST /api/captions              form: image (file), k?, rerank?, index? -> the collection's captions for it

Statuses: 400 bad input (an empty query), 404 no such index or row, 409 an index made by another
model than the server's or a question without a VQA model, 413 an upload over the limit, 415 an
upload that is not an image, 422 a field out of range. Model work runs one request at a time.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from ..data.samples import decode_image
from ..eval.heat_maps import heat_maps
from ..pictures import overlay
from .collection import read_image
from .uploads import FORM_SLACK, BodyLimit, UploadError, decode_upload

PAGE = Path(__file__).with_name("page.html")
MAX_K = 100
MAX_RERANK = 256


@dataclass
class ServedIndex:
    """An index as the server has it: a Searcher, or why it cannot be searched (`problem`)."""
    name: str
    folder: str
    images: int
    captions: int
    searcher: Optional[object] = None
    problem: Optional[str] = None


@dataclass
class Limits:
    max_upload_bytes: int = 8 << 20
    max_pixels: int = 40_000_000
    rerank: int = 64                      # the default re-ranking depth


class SearchRequest(BaseModel):
    text: str
    k: int = Field(10, ge=1, le=MAX_K)
    rerank: Optional[int] = Field(None, ge=0, le=MAX_RERANK)
    index: Optional[str] = None


class HeatmapRequest(BaseModel):
    text: str
    row: int = Field(ge=0)
    index: Optional[str] = None


def _media_type(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _public(hits: list) -> list[dict]:
    """Hits as the API gives them: without where the image is stored on the server."""
    return [{k: v for k, v in dataclasses.asdict(h).items() if k != "source"} for h in hits]


def _png_url(picture) -> str:
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def create_app(indexes: list, answerer=None, limits: Limits = Limits()) -> FastAPI:
    """The application over `indexes` (ServedIndex, the first usable one the default) and an
    optional QuestionAnswerer."""
    app = FastAPI(title="ALBEF-DS search", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes + FORM_SLACK)
    by_name = {i.name: i for i in indexes}
    default = next(i.name for i in indexes if i.searcher is not None)
    model_lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": fields}, status_code=422)

    def pick(name: Optional[str]) -> ServedIndex:
        served = by_name.get(name or default)
        if served is None:
            raise HTTPException(404, f"no index named {name!r}; this server has {', '.join(by_name)}")
        if served.problem:
            raise HTTPException(409, served.problem)
        return served

    def upload(image: UploadFile):
        data = image.file.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, f"{image.filename or 'the upload'} is larger than the "
                                     f"{limits.max_upload_bytes:,} bytes this server accepts")
        try:
            return decode_upload(data, limits.max_pixels)
        except UploadError as exc:
            raise HTTPException(exc.status, f"{image.filename or 'the upload'}: {exc}") from None

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/info")
    def info() -> dict:
        return {"indexes": [{"name": i.name, "images": i.images, "captions": i.captions, "usable": i.problem is None,
                             "problem": i.problem} for i in indexes],
                "default": default, "vqa": answerer is not None, "max_upload_bytes": limits.max_upload_bytes,
                "max_pixels": limits.max_pixels, "rerank": limits.rerank, "max_k": MAX_K}

    @app.post("/api/search")
    def search(request: SearchRequest) -> dict:
        served = pick(request.index)
        if not request.text.strip():
            raise HTTPException(400, "the query is empty: type what the images should show")
        rerank = limits.rerank if request.rerank is None else request.rerank
        try:
            with model_lock:
                result = served.searcher.images_for_text(request.text, request.k, rerank)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"index": served.name, "query": result.query, "hits": _public(result.hits),
                "reranked": result.reranked, "timings": result.timings}

    @app.get("/api/images/{index}/{row}")
    def image(index: str, row: int) -> Response:
        served = pick(index)
        if not 0 <= row < served.images:
            raise HTTPException(404, f"index {served.name!r} has rows 0..{served.images - 1}, not {row}")
        source = read_image(served.searcher.index.images[row]["source"])
        try:
            data = Path(source).read_bytes() if isinstance(source, str) else source
        except OSError as exc:
            raise HTTPException(404, f"image {row} of {served.name!r} cannot be read: {exc}") from None
        return Response(data, media_type=_media_type(data), headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/heatmap")
    def heatmap(request: HeatmapRequest) -> dict:
        served = pick(request.index)
        if not request.text.strip():
            raise HTTPException(400, "the query is empty: type what the images should show")
        if request.row >= served.images:
            raise HTTPException(404, f"index {served.name!r} has rows 0..{served.images - 1}, not {request.row}")
        searcher = served.searcher
        try:
            picture = decode_image(read_image(searcher.index.images[request.row]["source"]))
        except Exception as exc:              # PIL raises many types on broken files
            raise HTTPException(404, f"image {request.row} of {served.name!r} cannot be read: {exc}") from None
        try:
            with model_lock:
                maps = heat_maps(searcher.model, searcher.tokenizer, picture, request.text, "itm", searcher.max_tokens)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        panels = [{"word": "whole sentence", "image": _png_url(overlay(picture, maps.sentence))}]
        panels += [{"word": w, "image": _png_url(overlay(picture, m))} for w, m in zip(maps.words, maps.word_maps)]
        return {"index": served.name, "row": request.row, "text": request.text, "panels": panels}

    @app.post("/api/answer")
    def answer(image: UploadFile = File(...), question: str = Form(""), top: int = Form(5, ge=1, le=20)) -> dict:
        if answerer is None:
            raise HTTPException(409, "this server has no VQA model: start it with --vqa CHECKPOINT "
                                     "--answer_list answer_list.json to answer questions")
        if not question.strip():
            raise HTTPException(400, "the question is empty: ask something about the image")
        picture = upload(image)
        try:
            with model_lock:
                answers = answerer.answer(picture, question, top)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return {"question": question, "answers": answers}

    @app.post("/api/captions")
    def captions(image: UploadFile = File(...), k: int = Form(10, ge=1, le=MAX_K),
                 rerank: Optional[int] = Form(None, ge=0, le=MAX_RERANK), index: Optional[str] = Form(None)) -> dict:
        served = pick(index)
        if not served.searcher.index.has_texts:
            raise HTTPException(409, f"index {served.name!r} holds no captions to search")
        picture = upload(image)
        with model_lock:
            result = served.searcher.texts_for_image(picture, k, limits.rerank if rerank is None else rerank,
                                                     image.filename or "(upload)")
        return {"index": served.name, "hits": _public(result.hits), "reranked": result.reranked,
                "timings": result.timings}

    return app
