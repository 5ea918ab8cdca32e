"""The one settings object of the service side (environment variables, ``TOUCHSTONE_`` prefix).

Embedded default (no server but the Docker engine): everything lives under one data directory --
an SQLite database, a Celery broker on the local filesystem, a Celery result database in SQLite and
the storage folder. Production sets ``TOUCHSTONE_DATABASE_URL=postgresql+psycopg://...``,
``TOUCHSTONE_BROKER_URL=redis://...``, ``TOUCHSTONE_RESULT_BACKEND=redis://...`` and a shared
``TOUCHSTONE_STORAGE_DIR``.

Derived defaults (``database_url``, ``broker_url``, ``result_backend``, ``storage_dir``) are computed
from ``data_dir`` when they are not set explicitly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GIB = 1024**3
MIB = 1024**2


class Settings(BaseSettings):
    """Service configuration. Every field can be set as ``TOUCHSTONE_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="TOUCHSTONE_", env_file=None, extra="ignore")

    # --- where things live ------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="Root folder of the embedded deployment.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///{data_dir}/touchstone.db."
    )
    broker_url: str | None = Field(
        None, description="Celery broker; default filesystem:// (folders under data_dir/broker)."
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; default db+sqlite:///{data_dir}/celery-results.db."
    )
    storage_dir: Path | None = Field(None, description="Uploads and outputs; default {data_dir}/storage.")

    # --- API ------------------------------------------------------------------------------------
    api_url: str = Field("http://127.0.0.1:8000", description="Base URL the CLI talks to.")
    max_upload_bytes: int = Field(20 * GIB, gt=0, description="Largest accepted image tarball.")
    log_level: str = "INFO"
    max_request_body_bytes: int = Field(
        1 * MIB, gt=0, le=2**40,
        description="Largest body of any request but an image upload (413 before it is buffered).")
    metrics_public: bool = Field(
        False, description="Serve /metrics to anyone; default: organizers only (or metrics_port).")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Also serve /metrics unauthenticated on this internal port.")

    # --- trust boundaries -------------------------------------------------------------------------
    deployment_id: str = Field(
        "touchstone", pattern=r"^[A-Za-z0-9_.-]{1,63}$",
        description="Label on every container this deployment starts; clean-up touches only its own.")
    import_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders organizers may import manifests and result folders from through the API "
        "(JSON list or comma-separated); never the data directory.")
    allowed_registries: list[str] = Field(
        default_factory=list,
        description="Registries an image_ref may name (the worker pulls it for that submission).")
    default_min_group_size: int = Field(
        10, ge=1, le=1_000_000, description="Small-cell threshold k of a new test set.")
    max_team_storage_bytes: int = Field(
        200 * GIB, gt=0, description="Storage a team's submissions may hold (tarballs + outputs).")
    keep_failed_outputs: bool = Field(
        False, description="Keep the outputs of failed runs (debugging); default: deleted.")
    failed_tarball_grace_s: float = Field(
        24 * 3600.0, ge=0, description="Seconds a failed or cancelled submission's tarball and run outputs are kept "
        "(an organizer may re-run it meanwhile) before the reaper deletes them.")
    failed_validations_per_day: int = Field(
        10, ge=0, description="Failed validations a team may have per test set per day before intake refuses.")

    # --- default limits of a new test set (organizers change them per test set) ------------------
    default_time_per_case_s: float = Field(600.0, gt=0, description="Wall-clock seconds per case.")
    default_memory_bytes: int = Field(32 * GIB, gt=0, description="Container memory limit.")
    default_gpus: int = Field(1, ge=0, description="GPUs per container run.")
    default_shm_bytes: int = Field(2 * GIB, gt=0, description="/dev/shm size in the container.")
    default_pids_limit: int = Field(512, gt=0, description="Process limit in the container.")
    default_shard_size: int = Field(50, gt=0, description="Cases per container run.")
    default_quota_submissions: int = Field(3, ge=0, description="Counting submissions per team per period.")
    default_quota_period_days: int = Field(7, gt=0, description="Length of the quota period in days.")

    @field_validator("import_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        """``TOUCHSTONE_IMPORT_ROOTS=/srv/a,/srv/b`` or a JSON list; empty entries are dropped."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _derive_defaults(self) -> "Settings":
        data_dir = Path(self.data_dir)
        if self.database_url is None:
            self.database_url = f"sqlite:///{data_dir / 'touchstone.db'}"
        if self.broker_url is None:
            self.broker_url = "filesystem://"
        if self.result_backend is None:
            self.result_backend = f"db+sqlite:///{data_dir / 'celery-results.db'}"
        if self.storage_dir is None:
            self.storage_dir = data_dir / "storage"
        return self

    # --- helpers ----------------------------------------------------------------------------------
    @property
    def broker_folder(self) -> Path:
        """Folder of the ``filesystem://`` broker (messages are files in here)."""
        return Path(self.data_dir) / "broker"

    def broker_transport_options(self) -> dict[str, Any]:
        """Celery ``broker_transport_options`` matching ``broker_url``.

        The filesystem transport needs its folders; producer and consumer share one folder for
        messages (``data_folder_in == data_folder_out``) so any process on this machine sees them.
        """
        if not str(self.broker_url).startswith("filesystem://"):
            return {}
        from services.fsbroker import install  # kombu writes message files non-atomically

        install()
        messages = self.broker_folder / "messages"
        processed = self.broker_folder / "processed"
        control = self.broker_folder / "control"  # kombu's exchange tables; default is ./control
        for folder in (messages, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
        }

    @property
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")

    def ensure_dirs(self) -> None:
        """Create the data and storage folders (and an SQLite database's folder)."""
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        Path(self.storage_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        if self.is_sqlite:
            db_path = str(self.database_url).split("///", 1)[-1]
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call ``get_settings.cache_clear()`` after changing env)."""
    return Settings()
