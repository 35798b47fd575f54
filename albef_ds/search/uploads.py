"""What the web page accepts from a browser: request bodies up to a size, read as they arrive (a
larger one is answered 413 without being stored), and images decoded safely: only the usual
formats, the pixel count checked from the header before any pixel is decoded (a decompression
bomb never expands), the whole image decoded before it is used."""
from __future__ import annotations

import io
import json
import warnings

from PIL import Image, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
FORM_SLACK = 64 * 1024          # multipart boundaries and the question, beyond the image itself


class UploadError(ValueError):
    """Refused input, with the HTTP status that says why (413: too large, 415: not an image)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from uploaded bytes, or UploadError."""
    if not data:
        raise UploadError(400, "the upload is empty: choose an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            if image.width * image.height > max_pixels:
                raise UploadError(413, f"the image has {image.width} x {image.height} pixels, more than the "
                                       f"{max_pixels:,} this server decodes")
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise UploadError(415, f"the upload is not an image this server reads ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UploadError):
            raise
        raise UploadError(415, f"the image cannot be decoded: {exc}") from None


class BodyLimit:
    """ASGI middleware: a request whose body passes `limit` bytes (its Content-Length, or what has
    arrived so far) is answered 413 with a JSON message; the application's own answer is dropped."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": f"the request is larger than the {self.limit - FORM_SLACK:,} bytes this "
                                     "server accepts for an upload"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        state = {"received": 0, "over": False, "refused": False}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["over"]:
                if not state["refused"]:
                    state["refused"] = True
                    await self._refuse(send)
                return
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:                   # the application stopped reading a cut-off body
            if not state["over"]:
                raise
        if state["over"] and not state["refused"]:
            state["refused"] = True
            await self._refuse(send)
