"""``llama-steer serve``: llama-cpp-python's own OpenAI-compatible server, steered per request.

    llama-steer serve                                   # the embedded VLM and its headmap
    llama-steer serve -m model.gguf --mmproj mmproj.gguf --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [...],
         "steering": {"roi": "panel:4@2x3"}}'

The app is ``llama_cpp.server.app.create_app`` with its settings and flags (``--n_ctx``,
``--api_key``, ``--chat_format`` ...; llama.cpp-style aliases ``-m``, ``--mmproj``, ``-c``,
``-ngl``, ``-t``); llama-steer adds:

- a ``steering`` object in ``/v1/chat/completions`` and ``/v1/completions`` bodies, keys named
  like the CLI's flags: ``roi``, ``mode``, ``strength``, ``heads`` or ``top_k``,
  ``decode_only``, ``focus``, ``domain``, ``schedule`` (the CLI's grammar), and ``observe``
  (true: each streamed chunk says which region the steered heads attended to most for its
  token; also ``{name: roi}`` to name the regions). Unset keys come from the model's headmap,
  as in the CLI. No ``steering``: the plain model, token for token. Mirrors llama-server's
  per-request ``lora``.
- bad steering -> HTTP 400 ``{"error": {"message", "type": "invalid_request_error", "param":
  "steering.<key>"}}``, streamed or not; the server keeps serving.
- ``POST /v1/steering/retarget`` ``{"id": <completion id>, "roi": ...}``: move a running stream
  to another region from the next token on (the page's hover).
- ``GET /``: the browser page; ``GET /steer/strip.png``: a demo strip; ``GET /steer/info``.

Requests run one at a time (llama-cpp-python's model lock), so a request's steering is set at
its start and cleared at its end, and never seen by another request. Steering state lives in
the request: N replicas behind any HTTP load balancer serve it (retarget needs the replica
that runs the stream).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import math
import os
import re
import sys
import threading
from pathlib import Path

from llama_steer import Panel, SteeringConfig, SteeringError, comics
from llama_steer.apps.cli import (
    USAGE_ERROR,
    CliError,
    check_gguf_file,
    install_warning_format,
    make_steering,
    quiet_native_logs,
)
from llama_steer.messages import embedded_model
from llama_steer.steering import MODES

STATIC = Path(__file__).resolve().parent / "static"
# the request keys (the CLI's flag names); `headmap` and `saliency:` name server files, so a
# request cannot give them (the server's --headmap is every request's default)
KEYS = (
    "roi",
    "mode",
    "strength",
    "heads",
    "top_k",
    "decode_only",
    "focus",
    "domain",
    "schedule",
    "observe",
)
_TYPES = {
    "roi": (str,),
    "mode": (str,),
    "strength": (int, float),
    "heads": (str, list),
    "top_k": (int,),
    "decode_only": (bool,),
    "focus": (str,),
    "domain": (str,),
    "schedule": (str, list),
    "observe": (bool, dict),
}
_WORDS = {
    str: "a string",
    int: "a number",
    float: "a number",
    list: "a list",
    bool: "true or false",
    dict: "an object",
}
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/engines/copilot-codex/completions")


class RequestError(SteeringError):
    """Bad input in a request: HTTP 400; ``field`` names the steering key, ``message`` the
    fix (``param``: the request field, when not a steering key). str() carries both, so
    llama-cpp-python's route handler can tell it apart by its message (the only hook it
    has: ``_register_error_format``)."""

    def __init__(self, message: str, field: str | None = None, param: str | None = None):
        self.message = message
        if param is None:
            param = "steering" if field in (None, "steering") else f"steering.{field}"
        super().__init__(f"[llama-steer {param}] {message}", field=field)
        self.param = param


_WIRE = re.compile(r"^\[llama-steer ([\w.]+)\] (.*)$", re.S)


@dataclasses.dataclass(frozen=True)
class RequestSteering:
    """A request's ``steering`` object, checked: the config, the schedule (after N generated
    tokens, roi) and the observed regions ({name: roi}, or None).

    >>> rs = RequestSteering.from_json({"roi": "panel:4@2x3", "observe": True}, headmap=None)
    >>> rs.config.roi, rs.regions["panel:1@2x3"]
    ((Panel(k=4, ...),), 'panel:1@2x3')
    """

    config: SteeringConfig
    schedule: tuple = ()
    regions: dict | None = None

    @classmethod
    def from_json(cls, obj, headmap=None) -> RequestSteering:
        if not isinstance(obj, dict):
            raise RequestError(
                f'steering must be a JSON object like {{"roi": "panel:4@2x3"}}, got '
                f"{type(obj).__name__}",
                field="steering",
            )
        for key, value in obj.items():
            if key not in KEYS:
                hint = (
                    " (a request cannot name server files: start the server with --headmap)"
                    if key == "headmap"
                    else ""
                )
                raise RequestError(
                    f"steering.{key}: unknown key{hint}; known: {', '.join(KEYS)}", field=key
                )
            ok = _TYPES[key]
            if value is not None and (
                not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok)
            ):
                names = " or ".join(dict.fromkeys(_WORDS[t] for t in ok))
                raise RequestError(f"steering.{key}: expected {names}, got {value!r}", field=key)
        for key in ("roi", "domain", "schedule"):
            value = obj.get(key)
            texts = [value] if isinstance(value, str) else []
            if isinstance(value, list):
                texts = [e[1] for e in value if isinstance(e, list | tuple) and len(e) == 2]
            if any("saliency:" in str(t) for t in texts):
                raise RequestError(
                    f"steering.{key}: saliency: reads a file on the server, which a request "
                    "cannot name: send a region (panel:, box:, 50:99, a named region)",
                    field=key,
                )
        schedule = obj.get("schedule")
        if isinstance(schedule, list):
            schedule = _schedule_text(schedule)
        heads = obj.get("heads")
        if isinstance(heads, list):
            heads = ",".join(f"L{p[0]}H{p[1]}" for p in _pairs(heads))
        strength = obj.get("strength")
        if strength is not None and not math.isfinite(strength):
            raise RequestError(
                f"steering.strength: {strength} is not a finite number: pass e.g. 6 (logit "
                "units; 0 = unsteered)",
                field="strength",
            )
        # each key alone first, so an error names the key it is about
        for key in ("roi", "domain", "heads", "top_k", "decode_only", "focus"):
            value = heads if key == "heads" else obj.get(key)
            if value is not None:
                try:
                    SteeringConfig(**{key: value})
                except SteeringError as e:
                    raise RequestError(str(e), field=key) from None
        if obj.get("mode") is not None and obj["mode"] not in MODES:
            raise RequestError(
                f"steering.mode: {obj['mode']!r} is not one of {', '.join(MODES)}", field="mode"
            )
        args = argparse.Namespace(
            roi=obj.get("roi"),
            mode=obj.get("mode"),
            strength=strength,
            heads=heads,
            top_k=obj.get("top_k"),
            decode_only=obj.get("decode_only"),
            focus=obj.get("focus"),
            domain=obj.get("domain"),
            schedule=schedule,
            headmap=None,
        )
        try:
            steering, sched = make_steering(args, one_shot=False)
        except (CliError, SteeringError) as e:
            raise _as_request_error(e) from None
        config = steering.config
        if headmap is not None and config.heads is None:
            config = config.replace(headmap=headmap, top_k=config.top_k)
        regions = _regions(obj.get("observe"), config.roi)
        return cls(config, tuple((n, r) for n, r, _ in sched), regions)


def _pairs(heads: list) -> list:
    bad = [
        p
        for p in heads
        if not (
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
        )
    ]
    if bad or not heads:
        raise RequestError(
            f"steering.heads: a list of [layer, head] integer pairs (0-based), or a string "
            f"(all, layers:A-B, top:K, L3H5,L2H1); got {heads!r}",
            field="heads",
        )
    return heads


def _schedule_text(entries: list) -> str:
    """[[N, roi], ...] -> the CLI's "N:roi;M:roi"."""
    ok = all(
        isinstance(e, list)
        and len(e) == 2
        and isinstance(e[0], int)
        and not isinstance(e[0], bool)
        and isinstance(e[1], str)
        for e in entries
    )
    if not ok or not entries:
        raise RequestError(
            'steering.schedule: a list of [after N tokens, "roi"] pairs, e.g. '
            '[[0, "panel:1@2x3"], [6, "panel:4@2x3"]], or the CLI\'s "0:panel:1@2x3;6:..."; '
            f"got {entries!r}",
            field="schedule",
        )
    return ";".join(f"{n}:{r}" for n, r in entries)


def _as_request_error(e: Exception) -> RequestError:
    """The CLI's and the library's words, in the request's terms: --flag -> steering.flag,
    Python's keyword arguments likewise."""
    if isinstance(e, RequestError):
        return e
    text = str(e)
    m = re.search(r"--([a-z][a-z-]*)", text)
    field = getattr(e, "field", None) or (m.group(1).replace("-", "_") if m else None)
    text = re.sub(r"--([a-z][a-z-]*)", lambda g: "steering." + g.group(1).replace("-", "_"), text)
    for key in KEYS:
        text = re.sub(rf"(?<![\w.]){key}=", f"steering.{key}=", text)
    if field is None:
        field = next((k for k in KEYS if f"steering.{k}" in text), None)
    return RequestError(text, field=field)


def _bad_input(e: Exception) -> RequestError | None:
    """The request's fault, as a 400: steering, or an image llama.cpp cannot decode (the
    plain server answers that with a 500)."""
    if isinstance(e, SteeringError):
        err = _as_request_error(e)
        if err.field is None and not isinstance(e, RequestError):
            # steering keys were checked one by one before: this is about the prompt (a
            # context too small for the image, ...)
            err = RequestError(err.message, param="messages")
        return err
    if "Failed to create bitmap" in str(e) or "Failed to load image" in str(e):
        return RequestError(
            "an image in the messages could not be decoded: send a PNG, JPEG, BMP or GIF as "
            "a data: URI (or a URL the server can read)",
            param="messages",
        )
    return None


def _regions(observe, roi: tuple) -> dict | None:
    """The observed regions for ``observe``: the panels of a Panel ROI's layout, else the
    ROI and the rest of the image ("roi", "rest"), or the request's own {name: roi}."""
    if observe is None or observe is False:
        return None
    if isinstance(observe, dict):
        if not observe or not all(isinstance(v, str) for v in observe.values()):
            raise RequestError(
                'steering.observe: true, or {"name": "roi", ...} with ROI strings',
                field="observe",
            )
        for name, spec in observe.items():
            try:
                SteeringConfig(roi=spec)
            except SteeringError as e:
                raise RequestError(f"steering.observe.{name}: {e}", field="observe") from None
        return dict(observe)
    if not roi:
        raise RequestError(
            "steering.observe: true reports the region the heads look at among the ROI's "
            'panels: give steering.roi too, or name the regions ({"left": "left", ...})',
            field="observe",
        )
    panels = [t for t in roi if isinstance(t, Panel)]
    if panels:
        p = panels[0]
        n = p.of if p.of is not None else p.grid[0] * p.grid[1]
        layout = f"/{p.of}" if p.of is not None else f"@{p.grid[0]}x{p.grid[1]}"
        image = f"image{p.image}:" if p.image is not None else ""
        return {f"panel:{k}{layout}": f"{image}panel:{k}{layout}" for k in range(1, n + 1)}
    return {"roi": roi, "rest": "left+right"}


# -- the request's steering reaches the model through a context variable --------------------
@dataclasses.dataclass
class _State:
    """One request: its steering (None: unsteered), and what the run reports back for a
    response that is not streamed (the per-token regions), for the middleware to add."""

    steering: RequestSteering | None
    summary: dict | None = None
    error: RequestError | None = None  # met before the first token: the answer is a 400


_REQUEST: contextvars.ContextVar[_State | None] = contextvars.ContextVar(
    "llama_steer_request", default=None
)
_LIVE: dict[str, _Run] = {}  # completion id -> the run streaming it (for retarget)
_LIVE_LOCK = threading.Lock()


class _Run:
    """One request's steering on the served model: applied at the start, per-token work (the
    schedule, the observer) in a logits processor, cleared at the end. A later run supersedes
    an abandoned one (a client that left mid-stream): ``current`` tells which is live."""

    def __init__(self, llm, state: _State | None):
        self.llm = llm
        self.rs = state.steering if state is not None else None
        self.schedule = self.rs.schedule if self.rs is not None else ()
        self.tokens = 0  # generated so far
        self.regions: list = []  # per generated token: (top region, {name: mass})
        self.obs = None
        self.completion_id: str | None = None

    @property
    def current(self) -> bool:
        return self.llm._serve_run is self

    def start(self) -> None:
        llm = self.llm
        # the lock: an abandoned stream's generator may be closed (and finish) by the garbage
        # collector in another thread while this run starts
        with llm._serve_lock:
            old = llm._serve_run
            if old is not None:
                old.finish()  # an abandoned stream: its observer and registration go
            llm._serve_run = self
            try:
                _set(llm, self.rs.config if self.rs is not None else llm._serve_off)
                if self.rs is not None and self.rs.regions is not None:
                    self.obs = llm.steering.observe(self.rs.regions)
            except SteeringError as e:  # heads out of range, a headmap for another model, ...
                self.finish()
                raise _as_request_error(e) from None

    def logits_processor(self, input_ids, scores):
        # called once per generated token, after the eval whose logits pick it: the observer
        # holds the attention that drove this token; a schedule entry after N tokens applies
        # from the eval of token N on (as the CLI's --schedule)
        if not self.current:
            return scores
        self.tokens += 1
        if self.obs is not None:
            mass = self.obs.mass()
            names = self.obs.names
            top = names[int(mass.argmax())] if mass.size and mass.max() > 0 else None
            self.regions.append(
                (top, {n: round(float(m), 4) for n, m in zip(names, mass, strict=True)})
            )
        for after, roi in self.schedule:
            if after == self.tokens:
                self.llm.steering.update(roi=roi)
        return scores

    def chunk_info(self) -> dict | None:
        if self.obs is None:
            return None
        top, mass = self.regions[-1] if self.regions else (None, {})
        return {"region": top, "mass": mass}

    def register(self, completion_id: str) -> None:
        if self.completion_id is None:
            self.completion_id = completion_id
            with _LIVE_LOCK:
                _LIVE[completion_id] = self

    def finish(self) -> None:
        """Safe twice, and from another thread (see start)."""
        if self.completion_id is not None:
            with _LIVE_LOCK:
                if _LIVE.get(self.completion_id) is self:
                    del _LIVE[self.completion_id]
        with self.llm._serve_lock:
            if self.obs is not None:
                self.obs.close()
                self.obs = None
            if self.current:
                self.llm._serve_run = None
                _set(self.llm, self.llm._serve_off)


def _set(llm, config: SteeringConfig) -> None:
    """The model's steering becomes ``config``, every field (update() replaces fields)."""
    llm.steering.update(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def _served_class():
    """llama_steer.Llama, run per request (made lazily: importing llama_cpp loads libllama)."""
    from llama_cpp import LogitsProcessorList, llama_chat_format

    from llama_steer import Llama, Steering

    class ServedLlama(Llama):
        """The model a server loads: steering attached, off between requests. A request's
        run starts where llama-cpp-python hands it over: the chat handler (the server calls
        ``llama_cpp.Llama.create_chat_completion`` unbound) and ``create_completion``."""

        _serve_default_headmap = None  # the server's --headmap (a subclass sets it)

        def __init__(self, *args, **kwargs):
            self._serve_run: _Run | None = None
            self._serve_lock = threading.RLock()
            self._serve_depth = 0
            # between requests: no ROI, so no edit (the plain model, token for token)
            self._serve_off = SteeringConfig(headmap=self._serve_default_headmap)
            super().__init__(*args, steering=Steering(self._serve_off), **kwargs)
            chat = (
                self.chat_handler
                or self._chat_handlers.get(self.chat_format)
                or llama_chat_format.get_chat_completion_handler(self.chat_format)
            )

            def served_chat(**kw):
                return self._serve(chat, kw)

            self.chat_handler = served_chat

        def create_completion(self, *args, **kwargs):
            # a chat handler calls create_completion inside its run: that run owns it
            if self._serve_depth:
                return super().create_completion(*args, **kwargs)
            return self._serve(super().create_completion, kwargs, args)

        def _serve(self, call, kwargs, args=()):
            state = _REQUEST.get()
            run = _Run(self, state)
            try:
                run.start()
            except RequestError as e:
                if state is not None:
                    state.error = e
                raise
            if run.obs is not None or run.schedule:
                procs = LogitsProcessorList(list(kwargs.get("logits_processor") or []))
                procs.append(run.logits_processor)
                kwargs["logits_processor"] = procs
            self._serve_depth += 1
            try:
                out = call(*args, **kwargs)
            except (SteeringError, ValueError) as e:  # met while the prompt was laid out
                run.finish()
                err = _bad_input(e)
                if err is None:
                    raise
                if state is not None:
                    state.error = err  # a stream's 200 is held back: the middleware sends this
                raise err from None
            except BaseException:
                run.finish()
                raise
            finally:
                self._serve_depth -= 1
            if kwargs.get("stream", False):
                return self._stream(run, out)
            if run.obs is not None:
                # the route's response model drops unknown keys: the middleware adds it
                state.summary = {"regions": [top for top, _ in run.regions]}
            run.finish()
            return out

        @staticmethod
        def _stream(run: _Run, chunks):
            try:
                for chunk in chunks:
                    run.register(chunk["id"])
                    info = run.chunk_info()
                    if info is not None:
                        chunk["steering"] = info
                    yield chunk
            except SteeringError as e:
                raise _as_request_error(e) from None
            finally:
                run.finish()

    return ServedLlama


def _served_proxy(headmap):
    """llama-cpp-python's LlamaProxy whose loads make ServedLlama: its own loader (every
    ModelSettings field maps as in the plain server, --hf_model_repo_id included) runs with
    ServedLlama standing in for ``llama_cpp.Llama``, which that loader names directly."""
    import llama_cpp
    from llama_cpp.server.model import LlamaProxy

    served = type("ServedLlama", (_served_class(),), {"_serve_default_headmap": headmap})

    class ServedProxy(LlamaProxy):
        @staticmethod
        def load_llama_from_model_settings(settings):
            with _LOAD_LOCK, _swapped(llama_cpp, "Llama", served):
                return LlamaProxy.load_llama_from_model_settings(settings)

    return ServedProxy


_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _swapped(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# -- ASGI: the steering object, 400s, streamed errors ----------------------------------------
class SteeringMiddleware:
    """Reads ``steering`` from completion bodies into the request context; a bad one is a
    400. For streams it holds the response start until the first chunk, so a steering error
    met while the prompt is resolved (an ROI outside the image, ...) is a 400 too."""

    def __init__(self, app, headmap=None):
        self.app = app
        self.headmap = headmap

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTES:
            return await self.app(scope, receive, send)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None  # the app's own 422
        rs = None
        if isinstance(parsed, dict) and parsed.get("steering") is not None:
            try:
                rs = RequestSteering.from_json(parsed["steering"], self.headmap)
            except RequestError as e:
                return await _send_error(send, e)
        state = _State(rs)
        token = _REQUEST.set(state)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        held = None
        started = False
        body_parts: list[bytes] | None = None  # a JSON answer to add the regions to

        async def hold(msg):
            nonlocal held, started, body_parts
            if started is None:
                return  # replaced by the 400 below
            if (
                held is not None
                and state.error is not None
                and msg["type"] != "http.response.start"
            ):
                # sse-starlette ends a stream whose producer failed as an empty 200
                started = None
                await _send_error(send, state.error)
                return
            if msg["type"] == "http.response.start" and not started:
                held = msg
                if state.summary is not None:
                    body_parts = []
                return
            if body_parts is not None:
                body_parts.append(msg.get("body", b""))
                if msg.get("more_body"):
                    return
                msg = {"type": "http.response.body", "body": _with_summary(body_parts, state)}
                headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
                held = {
                    **held,
                    "headers": headers + [(b"content-length", str(len(msg["body"])).encode())],
                }
                body_parts = None
            if held is not None:
                started = True
                await send(held)
                held = None
            await send(msg)

        try:
            await self.app(scope, replay, hold)
        except BaseException as exc:
            err = _find(exc, SteeringError)
            if started is None:
                return
            if err is None or started:
                raise
            return await _send_error(send, _as_request_error(err))
        finally:
            _REQUEST.reset(token)
        if held is not None:
            await send(held)


def _with_summary(parts: list[bytes], state: _State) -> bytes:
    raw = b"".join(parts)
    try:
        out = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(out, dict) and "choices" in out:
        out["steering"] = state.summary
    return json.dumps(out).encode()


def _find(exc: BaseException, kind):
    if isinstance(exc, kind):
        return exc
    for sub in getattr(exc, "exceptions", ()) or ():
        found = _find(sub, kind)
        if found is not None:
            return found
    cause = exc.__cause__ or exc.__context__
    return _find(cause, kind) if cause is not None and cause is not exc else None


def _error_body(e: RequestError, param: str | None = None) -> dict:
    return {
        "error": {
            "message": e.message,
            "type": "invalid_request_error",
            "param": param or e.param,
            "code": "invalid_steering" if (param or e.param).startswith("steering") else None,
        }
    }


async def _send_error(send, e: SteeringError) -> None:
    data = json.dumps(_error_body(e)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _register_error_format() -> None:
    """Non-streamed requests: llama-cpp-python's route handler turns exceptions into
    OpenAI-style errors by message pattern (500 unless one matches): ours, a 400."""
    from llama_cpp.server.errors import RouteErrorHandler

    def steering_error(request, match):
        return 400, _error_body(RequestError(match.group(2)), param=match.group(1))["error"]

    RouteErrorHandler.pattern_and_formatters.setdefault(_WIRE, steering_error)


# -- the app -----------------------------------------------------------------------------------
def create_app(settings=None, headmap=None, **overrides):
    """The served app: llama-cpp-python's ``create_app`` for ``settings`` (a
    ``llama_cpp.server.settings.Settings``; default: the embedded VLM), steered per request.

    >>> app = create_app()                                   # the embedded VLM
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    >>> # POST /v1/chat/completions {"messages": [...], "steering": {"roi": "panel:4@2x3"}}
    """
    from fastapi.responses import FileResponse, JSONResponse, Response
    from llama_cpp.server import app as server_app
    from llama_cpp.server.settings import ModelSettings

    if settings is None:
        settings = default_settings(**overrides)
    if isinstance(headmap, str):
        from llama_steer import Headmap

        headmap = Headmap.load(headmap)
    model = ModelSettings.model_validate(settings)  # as llama-cpp-python's create_app reads it
    with _swapped(server_app, "LlamaProxy", _served_proxy(headmap)):
        app = server_app.create_app(settings=settings)
    _register_error_format()
    app.add_middleware(SteeringMiddleware, headmap=headmap)
    app.state.llama_steer = {"model": model.model_alias or model.model, "headmap": headmap}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/steer/strip.png", tags=["llama-steer"])
    async def strip(layout: str = "2x3", seed: int = 0):
        if layout not in comics.LAYOUTS:
            return JSONResponse(
                {
                    "error": {
                        "message": f"layout {layout!r}: use one of {list(comics.LAYOUTS)}",
                        "type": "invalid_request_error",
                        "param": "layout",
                        "code": None,
                    }
                },
                status_code=400,
            )
        return Response(
            comics.png_bytes(comics.render(comics.make_strip(seed, layout))), media_type="image/png"
        )

    @app.get("/steer/info", tags=["llama-steer"])
    async def info():
        llm = server_app._llama_proxy() if server_app._llama_proxy is not None else None
        r = llm.steering.resolved if llm is not None and llm.steering is not None else None
        return {
            "model": app.state.llama_steer["model"],
            "multimodal": model.clip_model_path is not None,
            "headmap": (r.headmap.source if r is not None and r.headmap is not None else None),
            "keys": list(KEYS),
            "layouts": list(comics.LAYOUTS),
        }

    async def retarget(request):  # a plain Starlette route: the request comes as it is
        try:
            body = await request.json()
        except ValueError:
            body = None
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("id"), str)
            or not isinstance(body.get("roi"), str)
        ):
            return JSONResponse(
                {
                    "error": {
                        "message": 'send {"id": "<completion id>", "roi": "panel:2@2x3"}',
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status_code=400,
            )
        with _LIVE_LOCK:
            run = _LIVE.get(body["id"])
        if run is None or not run.current:
            return JSONResponse(
                {
                    "error": {
                        "message": f"no stream {body['id']!r} is running on this server",
                        "type": "not_found_error",
                        "param": "id",
                        "code": None,
                    }
                },
                status_code=404,
            )
        try:
            SteeringConfig(roi=body["roi"])
            run.llm.steering.update(roi=body["roi"])
        except SteeringError as e:
            return JSONResponse(_error_body(_as_request_error(e)), status_code=400)
        return JSONResponse({"id": body["id"], "roi": body["roi"], "after_tokens": run.tokens})

    app.add_route("/v1/steering/retarget", retarget, methods=["POST"])
    return app


def default_settings(**fields):
    """Settings for the embedded VLM (its mmproj, the mtmd chat handler), overridable."""
    from llama_cpp.server.settings import Settings

    if fields.get("model") is None:
        text, mmproj = embedded_model()
        fields["model"] = text
        fields.setdefault("clip_model_path", mmproj)
        fields.setdefault("model_alias", "llama-steer-organism")
    if fields.get("clip_model_path") and not fields.get("chat_format"):
        fields["chat_format"] = "mtmd"
    fields.setdefault("host", "127.0.0.1")
    # the page runs a steered and a plain answer one after the other, and clients stream
    # side by side: a new request must wait its turn, not cut the running stream short
    fields.setdefault("interrupt_requests", False)
    fields.setdefault("verbose", False)
    return Settings(**{k: v for k, v in fields.items() if v is not None})


# -- command line --------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    from llama_cpp.server.cli import add_args_from_model
    from llama_cpp.server.settings import Settings

    p = argparse.ArgumentParser(
        prog="llama-steer serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_args_from_model(p, Settings)  # llama-cpp-python's server flags, as its own server
    g = p.add_argument_group("llama.cpp-style aliases and llama-steer")
    g.add_argument("-m", dest="model", help="text GGUF (default: the embedded VLM)")
    g.add_argument("--mmproj", dest="clip_model_path", help="multimodal projector GGUF")
    g.add_argument("-c", "--ctx-size", dest="n_ctx", type=int)
    g.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=int)
    g.add_argument("-t", "--threads", dest="n_threads", type=int)
    g.add_argument("-v", dest="verbose", action="store_const", const=True)
    g.add_argument(
        "--headmap", help="headmap JSON every request defaults to (default: the model's own)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    install_warning_format()
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        import uvicorn  # noqa: F401
        from llama_cpp.server import app as _  # noqa: F401
    except ImportError as e:
        print(
            f'llama-steer serve: {e.name} is missing: pip install "llama-steer[server]"',
            file=sys.stderr,
        )
        return USAGE_ERROR
    args = parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if v is not None and k != "headmap"}
    try:
        if fields.get("model"):
            check_gguf_file(fields["model"], "-m", projector=False)
        if fields.get("clip_model_path"):
            check_gguf_file(fields["clip_model_path"], "--mmproj", projector=True)
        settings = default_settings(**fields)
        quiet_native_logs(bool(settings.verbose))
        app = create_app(settings, headmap=args.headmap)
    except (CliError, SteeringError) as e:
        print(f"llama-steer serve: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    import uvicorn

    print(f"llama-steer serve: http://{settings.host}:{settings.port}/", file=sys.stderr)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_certfile=settings.ssl_certfile,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
