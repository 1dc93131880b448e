"""EchoTune settings: one pydantic model, loaded from the `args` of the Serve application
in `ray_config.yaml`.

The same file is what `serve deploy ray_config.yaml` reads, so the Serve app, every job and
the CLI see one configuration. A wrong key fails at start with its full path
(`applications[0].args.cf.factors: ...`), never later inside a replica.

    settings = load_settings("ray_config.yaml")
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

APP_NAME = "echotune"


class Strict(BaseModel):
    """Base for every settings block: unknown keys are typos, and typos are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(Strict):
    url: str | None = None
    """`redis://host:port/db` of an existing server. None: use the embedded server that
    `make demo` (or the test fixture) starts and registers under `paths.state_dir`."""
    stream_key: str = "echotune:events"
    """Redis Stream the gateway appends accepted events to."""
    dead_letter_key: str = "echotune:events:dlq"
    """Stream holding records a job could not process, with the reason."""
    key_prefix: str = "echotune"
    """Prefix of every key EchoTune writes, so one server can host several deployments."""
    appendonly: bool = True
    """Embedded server only: append-only file on, so acknowledged events survive a restart."""
    socket_timeout_s: float = Field(2.0, gt=0)
    """Client socket timeout; a hung Redis must not hang a request forever."""


class PathSettings(Strict):
    # Defaults go through the validator too, so `~` is expanded even when the key is omitted.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    state_dir: Path = Path("~/.echotune")
    """Where the world, event Parquet, artifacts and the embedded Redis live. Absolute (after
    `~` expansion) so that a job run from `ray job submit --working-dir .` finds the same
    folder as the driver. On a multi-node cluster, point it at a shared filesystem."""
    cache_dir: Path = Path("~/.cache/echotune")
    """Downloaded public data sets (MovieLens 100K), verified by checksum."""

    @field_validator("state_dir", "cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def world_dir(self) -> Path:
        return self.state_dir / "world"

    @property
    def events_dir(self) -> Path:
        return self.state_dir / "events"

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir / "artifacts"

    @property
    def redis_dir(self) -> Path:
        return self.state_dir / "redis"


class WorldSettings(Strict):
    """The simulated music world: catalogue, audio, listeners and their sessions."""

    seed: int = 7
    """Everything generated is a pure function of this seed and the sizes below."""
    n_users: int = Field(400, ge=1)
    """Listeners."""
    n_artists: int = Field(80, ge=1)
    """Artists; each belongs to one main genre."""
    n_tracks: int = Field(800, ge=1)
    """Tracks in the catalogue, spread over the artists."""
    genres: list[str] = Field(
        default_factory=lambda: ["rock", "pop", "jazz", "electronic", "hiphop", "classical", "folk", "metal"],
        min_length=2,
    )
    """Genre vocabulary; each has its own tempo and timbre in the synthesised audio."""
    days: int = Field(14, ge=1)
    """Length of the listening history."""
    end: datetime = datetime(2026, 11, 1, tzinfo=timezone.utc)
    """End of the history; events fall in [end - days, end)."""
    sessions_per_user: float = Field(6.0, gt=0)
    """Mean listening sessions per user over the whole history (Poisson)."""
    tracks_per_session: float = Field(8.0, gt=0)
    """Mean tracks per session (Poisson, at least 1)."""
    n_breakouts: int = Field(5, ge=0)
    """Tracks that suddenly take off at a known time: ground truth for trending."""
    breakout_boost: float = Field(25.0, ge=1)
    """How many times more likely a breakout track is picked once it has broken out."""
    clip_seconds: float = Field(4.0, gt=0)
    """Length of each synthesised audio clip."""
    sample_rate: int = Field(22050, ge=8000)
    """Sample rate of the synthesised clips."""


class GatewaySettings(Strict):
    max_batch: int = Field(1000, ge=1)
    """Most events accepted in one POST /v1/events."""
    max_future_s: float = Field(300.0, ge=0)
    """Events stamped further than this in the future are rejected (clock skew allowance)."""
    max_age_days: float = Field(3650.0, gt=0)
    """Events older than this are rejected. Generous by default so simulated history loads."""


class CFSettings(Strict):
    """Implicit-feedback ALS (Hu, Koren and Volinsky)."""

    factors: int = Field(32, ge=1)
    """Latent dimensions."""
    regularization: float = Field(5.0, ge=0)
    """L2 penalty. Must be large relative to alpha on sparse data (see DATA.md)."""
    alpha: float = Field(10.0, gt=0)
    """Confidence = 1 + alpha * weighted interactions."""
    iterations: int = Field(12, ge=1)
    """Alternating half-steps pairs."""
    cg_steps: int = Field(3, ge=1)
    """Conjugate-gradient steps per half-step, warm-started from the previous factors."""
    seed: int = 0
    """Initialisation seed: the same seed gives the same factors."""
    event_weights: dict[str, float] = Field(
        default_factory=lambda: {"play": 1.0, "like": 4.0, "skip": 0.0, "dislike": 0.0}
    )
    """Weight of each event type in the interaction matrix; unlisted types count 0."""


class ContentSettings(Strict):
    """Audio + metadata content embeddings."""

    embedding_dim: int = Field(16, ge=2)
    """PCA output dimensions of the L2-normalised embedding."""
    analysis_seconds: float = Field(30.0, gt=0)
    """Longest stretch of audio analysed per track (from the start)."""
    sample_rate: int = Field(22050, ge=8000)
    """Audio is resampled to this rate before analysis."""
    batch_size: int = Field(16, ge=1)
    """Tracks per map_batches call."""
    concurrency: int = Field(2, ge=1)
    """Feature-extraction actors."""
    cpus_per_actor: float = Field(0.5, gt=0)
    """CPUs each extraction actor reserves; below 1 so CF and trending can run beside it."""


class TrendingSettings(Strict):
    window_hours: int = Field(24, ge=1)
    """Recent window compared against the baseline."""
    baseline_hours: int = Field(24 * 6, ge=1)
    """Baseline before the recent window."""
    min_plays: float = Field(5.0, ge=0)
    """Weighted plays in the window below which a track cannot trend."""
    top_k: int = Field(50, ge=1)
    """Tracks kept in the trending list."""
    event_weights: dict[str, float] = Field(default_factory=lambda: {"play": 1.0, "like": 2.0})
    """Weight of each event type in trending counts."""


class ServingSettings(Strict):
    candidates: int = Field(200, ge=1)
    """Candidates pulled from each source before blending."""
    source_weights: dict[str, float] = Field(
        default_factory=lambda: {"cf": 1.0, "content": 0.5, "trending": 0.2, "popular": 0.1}
    )
    """Blend weight per candidate source; sources absent here are not used."""
    mmr_lambda: float = Field(0.8, ge=0, le=1)
    """MMR trade-off: 1 is pure relevance, 0 pure diversity."""
    artist_cap: int = Field(2, ge=1)
    """Most tracks by one artist in a response."""
    recent_plays: int = Field(20, ge=0)
    """Recent plays kept per user for content neighbours and freshness."""
    max_k: int = Field(200, ge=1)
    """Largest k a client may ask for."""
    reload_interval_s: float = Field(10.0, gt=0)
    """How often a replica checks for newly published model versions."""


class Settings(Strict):
    """Everything under `applications[name=echotune].args`."""

    redis: RedisSettings = RedisSettings()
    paths: PathSettings = PathSettings()
    world: WorldSettings = WorldSettings()
    gateway: GatewaySettings = GatewaySettings()
    cf: CFSettings = CFSettings()
    content: ContentSettings = ContentSettings()
    trending: TrendingSettings = TrendingSettings()
    serving: ServingSettings = ServingSettings()


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key path."""


def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def settings_from_args(args: dict[str, Any] | None, where: str = "args") -> Settings:
    """Validate an `args` mapping, naming every wrong key by its path."""
    try:
        return Settings.model_validate(args or {})
    except ValidationError as exc:
        problems = "; ".join(f"{_path(where, e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None


def load_settings(path: str | Path, app_name: str = APP_NAME) -> Settings:
    """Read `ray_config.yaml` and validate the EchoTune application's args."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("applications"), list):
        raise ConfigError(f"{path}: expected a Serve config with an `applications` list")
    for i, app in enumerate(doc["applications"]):
        if isinstance(app, dict) and app.get("name") == app_name:
            return settings_from_args(app.get("args"), where=f"applications[{i}].args")
    raise ConfigError(f"{path}: no application named {app_name!r} under `applications`")
