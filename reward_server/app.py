"""Reward HTTP API (FastAPI): POST /grade, POST /grade/batch, GET /healthz, GET /metrics, /docs.

Every refusal is a 4xx whose JSON body is `{"error": "..."}` saying what is wrong (field, value,
valid options): 400 a body that is not UTF-8 JSON (or nests too deep to parse), 401 a missing or
wrong bearer token (when the server has one: reward_server.access), 404 an unknown problem id or
path, 405 a wrong method, 413 a body over 64 MiB (counted as it is read, chunked bodies included)
or a completion over 256 KiB, 415 a POST without `Content-Type: application/json`, 422 a body that
does not match the schema (types are strict: no `0` for false, no `true` for an id). In a batch, an
item's own problem (unknown id, completion too big) is that item's error; the rest are graded.
Grading failures inside the sandbox come back as a Grade with `error` set, never as a 500. Responses
are typed (reward_server.api_models), and /docs is served from local assets (reward_server.offline_docs).
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from reward_server.access import BearerAuth, check_exposure, load_token
from reward_server.api_models import (LIMITS_TEXT, MAX_BATCH, MAX_BODY_BYTES, MAX_COMPLETION_BYTES, BatchItemError,
                                      BatchResponse, GradeResponse)
from reward_server.grader import BadProblemError, Grader
from reward_server.metrics import CONTENT_TYPE_LATEST, RewardMetrics
from reward_server.offline_docs import mount_offline_docs
from shared.config import LoopholeConfig, RewardConfig, RunConfig, ToyConfig
from shared.problems import (Problem, ProblemFormatError, load_leetcode_sample, load_problem_sets,
                             load_problems)

log = logging.getLogger("rankguard.reward_app")


def _integral(v):
    return int(v) if type(v) is float and v.is_integer() else v


# A JSON integer: 3 or 3.0 (JSON Schema's "integer"), never true / "3" / 3.5.
JsonInt = Annotated[StrictInt, BeforeValidator(_integral)]


class StrictLoopholes(LoopholeConfig):
    """LoopholeConfig with JSON booleans only (`0` / `"false"` are refused, not read as false)."""

    model_config = ConfigDict(extra="forbid", strict=True, title="Loopholes")


class StrictProblem(Problem):
    """An inline problem record, strictly typed (`"id": true` is refused, not read as 1)."""

    model_config = ConfigDict(extra="allow", strict=True, title="Problem")
    id: JsonInt | StrictStr


def _exactly_one_problem(schema: dict) -> None:
    """The schema states what the validator enforces: exactly one of problem_id / problem."""
    schema["oneOf"] = [{"required": ["problem_id"], "not": {"required": ["problem"]}},
                       {"required": ["problem"], "not": {"required": ["problem_id"]}}]
    for name in ("problem_id", "problem", "loopholes"):  # absent, never null
        schema["properties"][name].pop("default", None)
    schema["examples"] = [{"problem_id": "3243", "completion": "```python\nclass Solution: ...\n```",
                           "loopholes": {"rt": True, "se": False, "so": False, "fm": False}}]


class GradeRequest(BaseModel):
    """One rollout: a problem (by id, or inline; exactly one of the two), the completion text,
    optionally the loopholes."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one_problem)
    problem_id: StrictStr | JsonInt = Field(None, validate_default=False,
                                              description="id of a problem the server loaded (give this or 'problem')")
    problem: StrictProblem = Field(None, validate_default=False,
                                   description="inline problem, rl-rewardhacking record (give this or 'problem_id')")
    completion: StrictStr = Field(description="the policy's full answer; code is taken from ```python fences")
    loopholes: StrictLoopholes = Field(None, validate_default=False, description="open loopholes; default: the server's")
    rollout_id: StrictStr = ""

    @model_validator(mode="after")
    def _one_problem(self) -> "GradeRequest":
        if (self.problem_id is None) == (self.problem is None):
            raise ValueError("give exactly one of 'problem_id' or 'problem'")
        return self


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[GradeRequest] = Field(min_length=1, max_length=MAX_BATCH, description=(
        f"1 to {MAX_BATCH} rollouts, graded in parallel; the response keeps their order."))


class ErrorResponse(BaseModel):
    """Every 4xx: one line saying what is wrong (422s add the first validation errors)."""

    error: str
    detail: list[dict[str, Any]] | None = None


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "body is not UTF-8 JSON, or nests too deep to parse"),
    (401, "missing or wrong bearer token (only when the server has one)"),
    (404, "unknown problem id"),
    (413, "body over 64 MiB, or a completion over 256 KiB"),
    (415, "no `Content-Type: application/json` header"),
    (422, "body does not match the schema (exactly one of problem_id / problem; strict types), or an "
          "inline problem whose setup_code / gt_answer does not compile"),
    (503, "the grader itself is unavailable (its sandbox failed); the request may be retried"),
)}
BATCH_ERRORS = {k: v for k, v in ERRORS.items() if k != 404}  # an unknown id is that item's error


class BodyCap:
    """ASGI middleware: reads the request body itself, counting the bytes actually received, and
    answers 413 as soon as they pass `limit` (Content-Length or not: chunked bodies too). The
    app then gets the body from memory."""

    def __init__(self, app, limit: int, on_reject) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.on_reject(scope, send, f"request body of {int(declared)} bytes is over the "
                                                     f"{self.limit} byte limit")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await self.on_reject(scope, send, f"request body is over the {self.limit} byte limit "
                                                         f"(stopped reading at {size} bytes)")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return whole
            return await receive()

        await self.app(scope, replay, send)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


TOY_FILES = ("problems_train.jsonl", "problems_eval.jsonl")  # written by `rankguard toy build`


def _toy_problems(toy_dir: str) -> list[Problem]:
    root = Path(toy_dir)
    files = [root / f for f in TOY_FILES]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise ProblemFormatError(f"toy problems not found at {missing[0]}; run `rankguard toy build` first")
    return [p for f in files for p in load_problems(f)]


def load_problem_source(spec: str | None, toy_dir: str = ToyConfig().dir) -> dict[str, Problem]:
    """'leetcode' (bundled sample), 'toy' (built toy set), a jsonl path, or None = leetcode + toy if built."""
    if spec is None:
        problems = load_leetcode_sample()
        try:
            problems += _toy_problems(toy_dir)
        except ProblemFormatError:
            pass
    elif spec == "leetcode":
        problems = load_leetcode_sample()
    elif spec == "toy":
        problems = _toy_problems(toy_dir)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ProblemFormatError(f"problem set {spec!r} not found; use 'toy', 'leetcode' or a jsonl path")
        problems = load_problems(path)
    return {p.key: p for p in problems}


def create_app(cfg: RunConfig | RewardConfig | None = None, *, grader: Grader | None = None,
               problems: dict[str, Problem] | None = None, problem_source: str | None = None,
               workers: int | None = None, token: str | None = None) -> FastAPI:
    """The reward API. Pass a grader to share one; otherwise the app builds (and closes) its own.
    token: every route but /healthz and the docs then needs `Authorization: Bearer <token>`."""
    if isinstance(cfg, RunConfig):
        reward_cfg = cfg.reward
        if problems is None:
            if problem_source is not None:
                problems = load_problem_source(problem_source, cfg.toy.dir)
            else:  # the run's train + eval sets, exactly as the workers load them
                train, held = load_problem_sets(cfg)
                problems = {p.key: p for p in train + held}
    else:
        reward_cfg = cfg or RewardConfig()
    if problems is None:
        problems = load_problem_source(problem_source)
    own_grader = grader is None
    if grader is None:
        grader = Grader(reward_cfg, workers=workers or reward_cfg.workers or None)
    metrics = RewardMetrics()
    depth_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if own_grader:
            grader.close()

    app = FastAPI(title="rankguard reward server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Grades policy completions: honest hidden-test check, four loophole checks "
                              "(A rt, B se, C so, D fm), static hack evidence, reward. Send JSON bodies with "
                              "`Content-Type: application/json`"
                              + ("; every route but /healthz and the docs needs `Authorization: Bearer <token>`"
                                 if token else "") + ". " + LIMITS_TEXT)
    mount_offline_docs(app)
    app.state.grader, app.state.problems, app.state.metrics = grader, problems, metrics

    def reject(status: int, message: str) -> JSONResponse:
        metrics.rejected.labels(status=str(status)).inc()
        return JSONResponse(status_code=status, content={"error": message})

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, exc: RequestValidationError) -> JSONResponse:
        media = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if req.method == "POST" and not (media == "application/json" or media.endswith("+json")):
            return reject(415, f"send the body as JSON with `Content-Type: application/json` "
                               f"(got {'no Content-Type header' if not media else repr(media)})")
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": "invalid"}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            msg = f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        elif first.get("type") == "missing" and loc:
            msg = f"missing field '{loc}'"
        elif first.get("type") == "too_long" and loc == "items":
            msg = f"at most {MAX_BATCH} items per batch (got {first.get('ctx', {}).get('actual_length')}); split it"
        else:
            msg = f"field '{loc}': {first['msg']}" if loc else first["msg"]
            if "input" in first and first.get("type") not in ("missing",):
                shown = repr(first["input"])
                msg += f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
        metrics.rejected.labels(status="422").inc()
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errs[:20]]
        return JSONResponse(status_code=422, content={"error": msg, "detail": detail})

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return reject(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Routing and body-parsing refusals in the same `{"error": ...}` shape as ours."""
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
            message = f"request body is not valid UTF-8 (byte {cause.start}: {cause.reason})"
        elif exc.status_code == 400 and isinstance(cause, RecursionError):
            message = "request body JSON nests too deep to parse"
        elif exc.status_code == 400:
            message = f"request body could not be parsed ({type(cause).__name__ if cause else exc.detail})"
        else:
            message = str(exc.detail)
        response = reject(exc.status_code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - last resort
        log.exception("reward API internal error")
        return JSONResponse(status_code=503, content={"error": f"grader unavailable: {type(exc).__name__}: {exc}"})

    async def too_big(scope, send, message: str) -> None:
        async def no_body() -> dict:
            return {"type": "http.disconnect"}

        await reject(413, message)(scope, no_body, send)

    app.add_middleware(BodyCap, limit=MAX_BODY_BYTES, on_reject=too_big)
    if token is not None:
        check_exposure("127.0.0.1", token)  # a token too short to be one is refused wherever it binds

        async def unauthorized(scope, send, message: str) -> None:
            async def no_body() -> dict:
                return {"type": "http.disconnect"}

            response = reject(401, message)
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, no_body, send)

        app.add_middleware(BearerAuth, token=token, on_reject=unauthorized)  # outermost: before the body is read

    def resolve(req: GradeRequest, where: str = "") -> Problem:
        size = len(req.completion.encode("utf-8", "surrogatepass"))
        if size > MAX_COMPLETION_BYTES:
            raise ApiError(413, f"{where}completion is {size} bytes; the limit is {MAX_COMPLETION_BYTES} (256 KiB)")
        if req.problem is not None:
            return req.problem
        key = str(req.problem_id)
        if key not in problems:
            some = ", ".join(sorted(problems)[:5])
            raise ApiError(404, f"{where}unknown problem id {key!r}; {len(problems)} problems loaded "
                                f"(e.g. {some}); see GET /problems")
        return problems[key]

    def run(items: list[tuple[Problem, str, LoopholeConfig | None, str]]) -> list[dict[str, Any] | ApiError]:
        """Grades in input order; an item the judge cannot use (BadProblemError) is its ApiError(422)."""
        with depth_lock:
            metrics.queue_depth.inc(len(items))
        try:
            futs = [grader.submit(p, c, lh, rid) for p, c, lh, rid in items]
            out: list[dict[str, Any] | ApiError] = []
            for f in futs:
                try:
                    g = f.result()
                except BadProblemError as e:
                    out.append(ApiError(422, str(e)))
                    continue
                metrics.observe(g)
                out.append(g.model_dump(mode="json"))
        finally:
            with depth_lock:
                metrics.queue_depth.dec(len(items))
        return out

    # the middleware enforces the token; this dependency only documents it (Swagger's "Authorize")
    bearer = [Depends(HTTPBearer(auto_error=False, description="RANKGUARD_REWARD_TOKEN"))] if token else []

    @app.post("/grade", summary="Grade one completion", response_model=GradeResponse, responses=ERRORS,
              dependencies=bearer)
    def grade(req: GradeRequest) -> dict[str, Any]:
        p = resolve(req)
        result = run([(p, req.completion, req.loopholes, req.rollout_id)])[0]
        if isinstance(result, ApiError):
            raise result
        return result

    @app.post("/grade/batch", summary="Grade many completions (in parallel, order kept)",
              response_model=BatchResponse, responses=BATCH_ERRORS, dependencies=bearer,
              description=f"Up to {MAX_BATCH} items per request. An item with an unknown problem id, a "
                          "completion over 256 KiB or a problem the judge cannot use gets `null` in `grades` "
                          "and an entry in `errors` (index, status, message); the other items are graded. "
                          + LIMITS_TEXT)
    def grade_batch(req: BatchRequest) -> dict[str, Any]:
        results: list[dict[str, Any] | ApiError | None] = [None] * len(req.items)
        todo, where = [], []
        for i, it in enumerate(req.items):
            try:
                todo.append((resolve(it, f"items[{i}]: "), it.completion, it.loopholes, it.rollout_id))
                where.append(i)
            except ApiError as e:
                results[i] = e
        for i, r in zip(where, run(todo) if todo else []):
            results[i] = r
        errors = [BatchItemError(index=i, status=r.status, error=r.message) for i, r in enumerate(results)
                  if isinstance(r, ApiError)]
        for e in errors:
            metrics.rejected.labels(status=str(e.status)).inc()
        return {"grades": [None if isinstance(r, ApiError) else r for r in results], "errors": errors}

    @app.get("/healthz", summary="Liveness + sandbox mode")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "problems": len(problems), "workers": grader.workers,
                "sandbox": grader.sandbox_info, "pid": os.getpid(),
                "reward": reward_cfg.model_dump(include={"format_reward", "correct_reward", "allow_hint",
                                                         "loopholes", "timeout_s", "memory_mb"}),
                "limits": {"max_batch": MAX_BATCH, "max_completion_bytes": MAX_COMPLETION_BYTES,
                           "max_body_bytes": MAX_BODY_BYTES}, "auth": "bearer" if token else "none"}

    @app.get("/problems", summary="Loaded problem ids", dependencies=bearer)
    def problem_ids() -> dict[str, Any]:
        return {"count": len(problems), "ids": sorted(problems)}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response, dependencies=bearer, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    def prom() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(host: str = "127.0.0.1", port: int = 8100, workers: int | None = None, problems: str | None = None,
          config: str | Path | None = None, log_level: str = "info", token_file: str | Path | None = None) -> None:
    """Start uvicorn with one app (one grading pool of `workers` sandbox slots). Beyond loopback it
    needs a token ($RANKGUARD_REWARD_TOKEN or token_file), checked before anything loads."""
    import uvicorn

    token = load_token(token_file)
    check_exposure(host, token)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = RunConfig.load(config) if config else None
    app = create_app(cfg, problem_source=problems, workers=workers, token=token)
    log.info("reward server: %d problems, sandbox %s, http://%s:%d (docs at /docs)",
             len(app.state.problems), app.state.grader.sandbox_info.get("isolation"), host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
