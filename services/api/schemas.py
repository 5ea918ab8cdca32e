"""Request and response bodies of the API (pydantic v2)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, field_validator

from services.db.enums import Role, ShardState, SubmissionState

NAME = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._@+-]*$")
#: upper bounds of the limits an organizer sets (the columns are 64-bit for bytes, 32-bit otherwise)
MAX_BYTES = 2**44  # 16 TiB
MAX_COUNT = 1_000_000


class In(BaseModel):
    """A request body: text fields must be valid Unicode without NUL characters (PostgreSQL refuses
    NUL in text, and a lone surrogate cannot be stored as UTF-8) -- 422 instead of a database error."""

    #: server paths: checked by the import-roots confinement, which answers every bad path alike
    SERVER_PATHS: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _clean_text(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and info.field_name not in cls.SERVER_PATHS:
            if "\x00" in value:
                raise ValueError("contains a NUL character; remove it")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("is not valid Unicode text (a lone surrogate); send UTF-8 text") from None
        return value


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --- teams, users, tokens ------------------------------------------------------------------------
class TeamCreate(In):
    name: str = NAME


class TeamOut(Out):
    id: int
    name: str
    created_at: dt.datetime
    #: bytes the team's submissions hold in storage (tarballs and kept outputs; capped per team)
    storage_bytes: int = 0


class UserCreate(In):
    name: str = NAME
    role: Role
    team: str | None = Field(None, min_length=1, max_length=200, description="team name; created if new")


class UserOut(Out):
    id: int
    name: str
    role: Role
    team: str | None = None
    is_active: bool
    created_at: dt.datetime


class TokenCreate(In):
    label: str | None = Field(None, max_length=200)


class TokenOut(Out):
    id: int
    prefix: str
    label: str | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class TokenCreated(BaseModel):
    """The plain token appears here once; only its hash is stored."""

    token: str
    token_info: TokenOut
    user: UserOut


# --- test sets ------------------------------------------------------------------------------------
class TestSetImport(In):
    __test__ = False
    SERVER_PATHS = frozenset({"manifest_path", "protocol"})
    name: str = NAME
    manifest_path: str = Field(min_length=1, max_length=4096,
                               description="path of the manifest CSV on the server, inside TOUCHSTONE_IMPORT_ROOTS")
    protocol: str | None = Field(None, min_length=1, max_length=4096,
                                 description="protocol name or name@version (default touchstone), or a protocol "
                                 "file inside TOUCHSTONE_IMPORT_ROOTS")
    description: str | None = Field(None, max_length=10000)


class TestSetUpdate(In):
    __test__ = False
    description: str | None = Field(None, max_length=10000)
    time_per_case_s: float | None = Field(None, gt=0, le=86400)
    memory_bytes: int | None = Field(None, gt=0, le=MAX_BYTES)
    gpus: int | None = Field(None, ge=0, le=16)
    shm_bytes: int | None = Field(None, gt=0, le=MAX_BYTES)
    pids_limit: int | None = Field(None, gt=0, le=MAX_COUNT)
    shard_size: int | None = Field(None, gt=0, le=100_000)
    quota_submissions: int | None = Field(None, ge=0, le=MAX_COUNT)
    quota_period_days: int | None = Field(None, gt=0, le=3660)
    is_open: bool | None = None
    min_group_size: int | None = Field(
        None, ge=1, le=1_000_000,
        description="small-cell threshold k: groups with fewer hidden cases show no statistic to non-organizers")
    # statistics settings (services.db.testsets.update_statistics_settings; statistics recomputed)
    missing_policy: Literal["worst", "common"] | None = None
    stats_preset: Literal["touchstone-2024", "challenger", "default"] | None = None
    stats_options: dict[str, str | bool] | None = Field(
        None, description="zero_method, continuity, test_method, correction, test_correction, family, ci_method")
    subgroup_variables: list[Annotated[str, Field(max_length=100)]] | None = Field(None, max_length=50)
    #: services.rescoring.set_prediction_retention
    prediction_retention: str | None = Field(
        None, max_length=20, description="how long predictions are kept for re-scoring: 'all', 'none' or days ('30d')")


class TestSetOut(Out):
    __test__ = False
    id: int
    name: str
    description: str | None
    protocol_key: str
    manifest_sha256: str
    n_cases: int = 0
    n_public_sample: int = 0
    time_per_case_s: float
    memory_bytes: int
    gpus: int
    shm_bytes: int
    pids_limit: int
    shard_size: int
    quota_submissions: int
    quota_period_days: int
    is_open: bool
    min_group_size: int = 10
    #: days predictions are kept after scoring (None: all, 0: none); services/rescoring.py
    prediction_retention_days: int | None = None
    created_at: dt.datetime


class RescoreRequest(In):
    """Re-score kept predictions of a test set under another protocol version (services/rescoring.py)."""

    SERVER_PATHS = frozenset({"protocol"})
    protocol: str = Field(min_length=1, max_length=4096,
                          description="a preset, NAME@VERSION, or a protocol file inside TOUCHSTONE_IMPORT_ROOTS")
    submission_ids: list[Annotated[int, Field(ge=1, le=2**62)]] | None = Field(
        None, max_length=10000, description="default: every scored or published submission")


class CaseOut(Out):
    case_id: str
    hospital: str | None
    age: int | None
    sex: str | None
    race: str | None
    manufacturer: str | None
    scanner: str | None
    contrast_phase: str | None
    diagnosis: str | None
    extra: dict[str, Any]
    public_sample: bool


# --- algorithms -------------------------------------------------------------------------------------
class AlgorithmCreate(In):
    name: str = NAME
    description: str | None = Field(None, max_length=10000)
    paper_url: HttpUrl | None = None
    code_url: HttpUrl | None = None
    team: str | None = Field(None, min_length=1, max_length=200, description="organizers only: the owning team")


class AlgorithmOut(Out):
    id: int
    name: str
    team: str
    description: str | None
    paper_url: str | None
    code_url: str | None
    created_at: dt.datetime


# --- submissions -----------------------------------------------------------------------------------
class SubmissionOut(Out):
    id: int
    algorithm: str
    team: str
    testset: str
    state: SubmissionState
    failure_reason: str | None
    #: the code of that reason (services.db.enums.FailureCode value), None when it did not fail
    failure_code: str | None = None
    image_ref: str | None
    image_sha256: str | None
    image_digest: str | None
    image_size_bytes: int | None
    counts_against_quota: bool
    is_baseline: bool
    rerun_count: int
    #: bytes it holds in storage now (its tarball and kept outputs)
    storage_bytes: int = 0
    received_at: dt.datetime
    validating_at: dt.datetime | None
    queued_at: dt.datetime | None
    running_at: dt.datetime | None
    evaluating_at: dt.datetime | None
    scored_at: dt.datetime | None
    published_at: dt.datetime | None
    failed_at: dt.datetime | None
    cancelled_at: dt.datetime | None


class SubmissionLogs(BaseModel):
    id: int
    state: SubmissionState
    failure_reason: str | None
    failure_code: str | None = None
    validation_log: str | None


class ShardOut(Out):
    index: int
    case_ids: list[str]
    state: ShardState
    attempts: int
    worker_hostname: str | None
    container_id: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    exit_code: int | None
    peak_memory_bytes: int | None
    gpu_memory_peak_bytes: int | None
    gpu_memory_auc: float | None
    failure_reason: str | None
    failure_code: str | None = None
    log_tail: str | None


class ReasonIn(In):
    reason: str | None = Field(None, max_length=2000)


# --- results ---------------------------------------------------------------------------------------
class ScoreOut(BaseModel):
    case_id: str
    hospital: str | None
    organ: str
    protocol_key: str
    dsc: float | None
    nsd: float | None
    hd95: float | None
    assd: float | None
    status: str
    detail: str | None


class ScorePage(BaseModel):
    submission_id: int
    total: int
    offset: int
    limit: int
    items: list[ScoreOut]
