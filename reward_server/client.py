"""HTTP client of the reward server: `RewardClient(url).grade(...)` / `.grade_batch(...)`.

Transport errors and 502/503/504 are retried with exponential backoff; a 4xx raises
RewardClientError carrying the server's one-line message. A batch item the server could not grade
(unknown id, completion too big) raises too, naming the item, unless `grade_batch(..., errors="none")`
asks for None in its place. The bearer token comes from `token=` or $RANKGUARD_REWARD_TOKEN.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable, Literal

import httpx

from shared.config import LoopholeConfig
from shared.problems import Problem
from shared.schemas import Grade

RETRY_STATUS = {502, 503, 504}
TOKEN_ENV = "RANKGUARD_REWARD_TOKEN"  # reward_server.access


class RewardClientError(ValueError):
    """The server refused the request (4xx) or stayed unreachable after all retries."""


def _item(problem: str | int | Problem, completion: str, loopholes: LoopholeConfig | dict | None,
          rollout_id: str) -> dict[str, Any]:
    item: dict[str, Any] = {"completion": completion, "rollout_id": rollout_id}
    if isinstance(problem, Problem):
        item["problem"] = problem.model_dump(mode="json")
    else:
        item["problem_id"] = str(problem)
    if loopholes is not None:
        item["loopholes"] = loopholes.model_dump() if isinstance(loopholes, LoopholeConfig) else dict(loopholes)
    return item


class RewardClient:
    def __init__(self, url: str, timeout: float = 120.0, retries: int = 4, backoff: float = 0.25,
                 token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        token = token or os.environ.get(TOKEN_ENV, "").strip() or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def _request(self, method: str, path: str, **kw) -> Any:
        last: str = ""
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, path, **kw)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    return r.json()
                try:
                    msg = r.json().get("error") or r.text
                except ValueError:
                    msg = r.text
                if r.status_code not in RETRY_STATUS:
                    raise RewardClientError(f"{method} {path}: HTTP {r.status_code}: {msg}")
                last = f"HTTP {r.status_code}: {msg}"
            if attempt < self.retries:
                time.sleep(self.backoff * (2 ** attempt))
        raise RewardClientError(f"{method} {self.url}{path} failed after {self.retries + 1} tries: {last}")

    def grade(self, problem: str | int | Problem, completion: str,
              loopholes: LoopholeConfig | dict | None = None, rollout_id: str = "") -> Grade:
        """Grade one completion for a problem id the server knows, or an inline Problem."""
        return Grade.model_validate(self._request("POST", "/grade", json=_item(problem, completion, loopholes,
                                                                               rollout_id)))

    def grade_batch(self, items: Iterable[tuple[str | int | Problem, str]],
                    loopholes: LoopholeConfig | dict | None = None,
                    errors: Literal["raise", "none"] = "raise") -> list[Grade | None]:
        """Grade many (problem, completion) pairs in one request; order kept. An item the server could
        not grade raises RewardClientError (errors="raise") or comes back as None (errors="none")."""
        body = {"items": [_item(p, c, loopholes, "") for p, c in items]}
        out = self._request("POST", "/grade/batch", json=body)
        failed = out.get("errors") or []
        if failed and errors == "raise":
            first = failed[0]
            more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
            raise RewardClientError(f"POST /grade/batch: item {first['index']}: HTTP {first['status']}: "
                                    f"{first['error']}{more}")
        return [None if g is None else Grade.model_validate(g) for g in out["grades"]]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
