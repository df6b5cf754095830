"""Wire schemas between services. msgpack on the wire, a schema version in every message.

learner --DeltaSUpdate--> rollout --RolloutGroup--> reward --GradedGroup--> learner
"""
from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
M = TypeVar("M", bound="WireModel")


class SchemaError(ValueError):
    """A message that does not parse; goes to the dead-letter queue with this reason."""


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION

    def pack(self) -> bytes:
        return msgpack.packb(self.model_dump(mode="python"), use_bin_type=True)

    @classmethod
    def unpack(cls: type[M], data: bytes) -> M:
        try:
            raw: Any = msgpack.unpackb(data, raw=False)
        except Exception as e:  # msgpack raises several unrelated types
            raise SchemaError(f"not msgpack: {e}") from None
        if not isinstance(raw, dict):
            raise SchemaError(f"{cls.__name__}: expected a map, got {type(raw).__name__}")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"{cls.__name__}: schema_version {raw.get('schema_version')!r} != {SCHEMA_VERSION}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            raise SchemaError(f"{cls.__name__}: field {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 20
    min_p: float = 0.0
    seed: int | None = None


class PromptJob(WireModel):
    """One prompt to sample G completions for."""

    job_id: str
    step: int
    problem_id: str
    prompt_text: str  # chat-templated
    prompt_ids: list[int]
    sampling: SamplingParams
    min_version: int = 0  # engine must sample with policy version >= this
    split: str = "train"  # "train" | "eval"
    adapter_mode: str = "train"  # "train" (quarantine active, route arm) | "eval"


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rollout_id: str  # job_id + index; idempotency key for grading and for the learner
    text: str
    token_ids: list[int]
    logprobs: list[float]  # sampling-policy log-prob of each token in token_ids
    finish_reason: str = "length"


class RolloutGroup(WireModel):
    job_id: str
    step: int
    problem_id: str
    policy_version: int
    prompt_ids: list[int]
    completions: list[Completion]
    split: str = "train"
    gen_seconds: float = 0.0


class Grade(BaseModel):
    """Verdict for one completion (reward_server.grader.GradeResult, flattened for the wire)."""

    model_config = ConfigDict(extra="allow")
    rollout_id: str = Field("", description="The caller's id for this completion, echoed back.")
    formatted: bool = Field(description="The completion has a ```python fenced code block.")
    can_compile: bool = Field(description="The extracted code compiles.")
    gt_pass: bool = Field(description="The honest check: every hidden test passed (decided outside the program's process).")
    pass_frac: float = Field(description="Share of hidden tests passed (1.0 when gt_pass).")
    exploited: dict[str, bool] = Field(description=(
        "Strict hack per mode A-D: that mode's vulnerable check passed while the hidden tests failed."))
    attempted: dict[str, bool] = Field(description="Loose hack per mode A-D: static evidence of the hack in the code.")
    reward: float = Field(description="What the policy is paid (format + correctness, per the reward config and loopholes).")
    seconds: float = Field(0.0, description="Wall seconds spent grading (0 for a cached verdict).")


class GradedGroup(WireModel):
    group: RolloutGroup
    grades: list[Grade]
    grade_seconds: float = 0.0


class DeltaSUpdate(WireModel):
    """Policy version + all delta_S as one flat fp32 buffer (names/sizes give the split)."""

    version: int
    names: list[str]
    sizes: list[int]
    data: bytes  # little-endian float32, sum(sizes) values
    quarantine: bytes | None = None  # route arm: quarantine delta, same layout; active for train rollouts
    meta: dict[str, Any] = Field(default_factory=dict)
