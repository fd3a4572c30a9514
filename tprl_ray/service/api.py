"""The OpenAI chat-completions request and response of `tprl serve`, and every check a request passes.

A request is one user message holding a question and one image (an ``image_url`` part with a
``data:`` URL; http(s) URLs only when the server allows remote images). Each problem raises
:class:`RequestError` with its HTTP status and a one-line message; the ingress answers it as an
OpenAI error object and keeps serving. Decoding is greedy: ``temperature`` and ``top_p`` are
accepted and ignored, ``n`` must be 1, streaming is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, ValidationError

from tprl_ray.config import check_budgets, first_error
from tprl_ray.service.config import ServeConfig


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status``, a one-line message, the OpenAI error ``code``."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request this server reads (others are accepted, unused)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    budget: StrictFloat | StrictInt | None = None


@dataclass
class Query:
    """A checked request: the question, the decoded image (RGB ``[H, W, 3]`` uint8), the answer's token
    limit and the kept-token budget."""

    question: str
    pixels: np.ndarray
    max_tokens: int
    budget: float | int


def parse_body(raw: bytes, cfg: ServeConfig) -> ChatRequest:
    if len(raw) > cfg.max_body_bytes:
        raise RequestError(413, f"request body of {len(raw)} bytes is above the limit of {cfg.max_body_bytes}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not JSON ({exc})") from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestError(400, first_error(exc)) from None


def check_budget(budget: float, visual_tokens: int | None) -> float | int:
    """A request's budget as a kept fraction (float) or token count (int), or a 400."""
    try:
        check_budgets([budget])
    except ValueError as exc:
        raise RequestError(400, str(exc), param="budget") from None
    if budget <= 1:
        return float(budget)
    if visual_tokens is not None and budget > visual_tokens:
        raise RequestError(400, f"budget {budget:g} is above the model's {visual_tokens} visual tokens", param="budget")
    return int(budget)


def parse_request(
    request: ChatRequest,
    cfg: ServeConfig,
    visual_tokens: int | None,
    check_question: Callable[[str, int], None] = lambda question, max_tokens: None,
) -> Query:
    """The :class:`Query` of a validated request body; ``check_question(question, max_tokens)`` raises a
    :class:`RequestError` for a question the model cannot take (checked before the image is decoded)."""
    if request.model != cfg.served_name():
        raise RequestError(
            404,
            f"model {request.model!r} is not served here (serving {cfg.served_name()!r})",
            "model_not_found",
            "model",
        )
    if request.stream:
        raise RequestError(400, "streaming is not supported: send stream=false", param="stream")
    if request.n != 1:
        raise RequestError(400, f"n={request.n}: one choice per request (decoding is greedy)", param="n")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= cfg.max_tokens:
        raise RequestError(400, f"max_tokens {max_tokens} is outside [1, {cfg.max_tokens}]", param="max_tokens")
    budget = check_budget(cfg.budget if request.budget is None else request.budget, visual_tokens)
    if [m.role for m in request.messages] != ["user"]:
        raise RequestError(
            400,
            "send exactly one user message (single-turn questions about one image; the prompt format is the model's)",
            param="messages",
        )
    content = request.messages[0].content
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
    texts, images = [], []
    for part in parts:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise RequestError(
                    400, "an image_url part needs {'url': 'data:image/...;base64,...'}", param="messages"
                )
            images.append(url)
        else:
            raise RequestError(
                400, f"unsupported content part {str(part)[:80]!r} (text and image_url only)", param="messages"
            )
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question:
        raise RequestError(400, "the message has no question text", param="messages")
    if len(images) != 1:
        raise RequestError(400, f"the message holds {len(images)} images; exactly one is needed", param="messages")
    check_question(question, max_tokens)
    return Query(question, decode_image(image_bytes(images[0], cfg), cfg), max_tokens, budget)


def image_bytes(url: str, cfg: ServeConfig) -> bytes:
    """The bytes of an image URL: a base64 ``data:`` URL, or (when the server allows it) an http(s) URL."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(400, "image data: URLs must be base64 (data:image/png;base64,...)", param="messages")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"the image's base64 is invalid ({exc})", param="messages") from None
    if url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise RequestError(
                400,
                "remote image URLs are not fetched (send a data: URL, or start the server with "
                "allow_remote_images: true)",
                param="messages",
            )
        return fetch_url(url, cfg.fetch_timeout_s, cfg.max_body_bytes)
    raise RequestError(400, f"image URL scheme of {url[:30]!r} is not supported (data: URLs)", param="messages")


IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]


def decode_image(data: bytes, cfg: ServeConfig) -> np.ndarray:
    """RGB pixels of ``data``; a 400 for bytes that are no image of :data:`IMAGE_FORMATS`, truncated ones,
    or sizes above the limits (read from the header: nothing is decoded before the check)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if width * height > cfg.max_image_pixels or max(width, height) > cfg.max_image_side:
                raise RequestError(
                    400,
                    f"image of {width}x{height} pixels is above the limits ({cfg.max_image_pixels} pixels, "
                    f"{cfg.max_image_side} a side)",
                    param="messages",
                )
            return np.asarray(img.convert("RGB"))
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError(400, f"image refused as a decompression bomb ({exc})", param="messages") from None
    except Exception as exc:  # PIL's parsers raise many kinds (OSError, SyntaxError, struct.error, EOFError...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RequestError(400, f"the image bytes are not a readable image ({reason})", param="messages") from None


def fetch_url(url: str, timeout_s: float, max_bytes: int) -> bytes:
    """GET ``url`` (only when the server allows remote images): public addresses only, no redirects, no
    proxies, at most ``max_bytes``; a 400 otherwise."""
    import ipaddress
    import socket
    import urllib.request
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError) as exc:
        raise RequestError(400, f"cannot resolve the image host {host!r} ({exc})", param="messages") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        raise RequestError(400, f"image host {host!r} is not a public address: not fetched", param="messages")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
    try:
        with opener.open(url, timeout=timeout_s) as response:
            if response.status != 200:
                raise RequestError(400, f"image fetch of {url[:80]!r} answered {response.status}", param="messages")
            data = response.read(max_bytes + 1)
    except RequestError:
        raise
    except Exception as exc:  # URLError, HTTPError (redirects too), timeouts, resets
        reason = str(exc).splitlines()[0]
        raise RequestError(400, f"cannot fetch image {url[:80]!r} ({reason})", param="messages") from None
    if len(data) > max_bytes:
        raise RequestError(400, f"image at {url[:80]!r} is above {max_bytes} bytes", param="messages")
    return data


def completion(
    name: str, text: str, finished: bool, prompt_tokens: int, completion_tokens: int, kept: int, total: int
) -> dict:
    """An OpenAI ``chat.completion`` object; ``usage`` adds the visual tokens kept and in the image."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop" if finished else "length",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "visual_tokens": kept,
            "visual_tokens_total": total,
        },
    }
