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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.keys import INGEST_TAG, hash_tag

APP_NAME = "echotune"


class Strict(BaseModel):
    """Base for every settings block: unknown keys are typos, and typos are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(Strict):
    url: str | None = None
    """`redis://host:port/db` of an existing server. None: use the embedded server that
    `make demo` (or the test fixture) starts and registers under `paths.state_dir`.
    `redis+cluster://host:port[,host:port...]` (`rediss+cluster://` with TLS) is a Redis
    Cluster reached through redis-py's cluster client from those seed nodes; it requires
    `stream_key` and `dead_letter_key` to carry the `{events}` hash tag (app/keys.py)."""
    stream_key: str = "echotune:events"
    """Redis Stream the gateway appends accepted events to."""
    dead_letter_key: str = "echotune:events:dlq"
    """Stream holding records a job could not process, with the reason."""
    key_prefix: str = "echotune"
    """Prefix of every key EchoTune writes, so one server can host several deployments."""
    appendonly: bool = True
    """Embedded server only: append-only file on, so acknowledged events survive a restart."""
    appendfsync: Literal["always", "everysec"] = "always"
    """Embedded server only: "always" fsyncs each write before Redis answers, so no acknowledged
    event is lost even on a power cut; "everysec" may lose up to a second of them, for speed."""
    socket_timeout_s: float = Field(2.0, gt=0)
    """Client socket timeout; a hung Redis must not hang a request forever."""

    @model_validator(mode="after")
    def _ingest_keys_share_a_slot(self) -> "RedisSettings":
        # The ingest scripts touch the stream, the dead-letter stream and `{events}`-tagged keys
        # in one call; on a cluster all of them must hash to one slot.
        if self.url and self.url.partition("://")[0].endswith("+cluster"):
            wrong = [f for f in ("stream_key", "dead_letter_key") if hash_tag(getattr(self, f)) != INGEST_TAG]
            if wrong:
                raise ValueError(
                    f"{' and '.join(wrong)} must carry the hash tag {{{INGEST_TAG}}} with a Redis Cluster url, e.g. "
                    f'stream_key "echotune:{{{INGEST_TAG}}}" and dead_letter_key "echotune:{{{INGEST_TAG}}}:dlq"'
                )
        return self


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

    @property
    def features_dir(self) -> Path:
        """Offline feature snapshots, one per materialisation (point-in-time retrieval, parity)."""
        return self.state_dir / "features"


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
    max_body_bytes: int = Field(2_000_000, ge=1)
    """Largest POST body accepted (413 above it), checked before the events are parsed."""
    dedup_window_s: int = Field(24 * 3600, ge=1)
    """How long an `event_id` is remembered: a retry within this window is a duplicate. Redis
    holds about 85 bytes per event accepted in the window (a quarter window more at most), so
    a day at a sustained 1,000 events/s is about 7.3 GB: size it to your retry horizon."""
    session_gap_s: float = Field(1800.0, gt=0)
    """Inactivity (event time) after which a user's next event starts a new session."""
    unavailable_retry_after_s: int = Field(1, ge=1)
    """`Retry-After` sent with the 503 answered when Redis cannot be reached."""
    in_process: bool = True
    """Run ingestion inside the ingress replica (one Serve hop per batch); false: call the
    EventGateway deployment through its handle (scaled apart, one more hop)."""


class ScopeLimit(Strict):
    """One token bucket: `burst` requests at once, refilled at `rate_per_s`."""

    rate_per_s: float = Field(gt=0)
    """Sustained requests per second a key may make under this scope."""
    burst: int = Field(ge=1)
    """Bucket size: requests a key may make at once after being idle."""


class AuthSettings(Strict):
    """API keys (scopes ingest, read, admin), stored as salted hashes in Redis."""

    enabled: bool = True
    """Off only for local experiments: every route except health and docs then needs no key."""
    cache_ttl_s: float = Field(2.0, ge=0)
    """How long a replica trusts a key record it read; a revoked key stops working after at
    most this long. 0: read Redis on every request."""


class RateLimitSettings(Strict):
    """Per-key token buckets in Redis (one atomic Lua script), exact across replicas."""

    ingest: ScopeLimit = ScopeLimit(rate_per_s=200.0, burst=400)
    """Limit of a key on routes that need the ingest scope (POST /v1/events)."""
    read: ScopeLimit = ScopeLimit(rate_per_s=100.0, burst=200)
    """Limit of a key on routes that need the read scope (GET routes)."""
    admin: ScopeLimit = ScopeLimit(rate_per_s=10.0, burst=20)
    """Limit of a key on admin routes."""


class ConsumerSettings(Strict):
    """Consumer group applying the online updates serving needs (jobs/consume_events.py)."""

    group: str = "online-updates"
    """Consumer group name on the event stream."""
    consumers: int = Field(2, ge=1)
    """Consumer actors started by `jobs.consume_events`."""
    batch_size: int = Field(200, ge=1)
    """Entries read per XREADGROUP."""
    block_ms: int = Field(1000, ge=0)
    """How long a read waits for new entries before the consumer checks for stale pending ones."""
    max_attempts: int = Field(5, ge=1)
    """Attempts for a transient failure before the event is dead-lettered."""
    backoff_base_s: float = Field(0.05, ge=0)
    """First retry delay; doubles per attempt, with full jitter."""
    backoff_max_s: float = Field(2.0, ge=0)
    """Cap on one retry delay."""
    claim_idle_ms: int = Field(30_000, ge=1)
    """Pending entries idle this long (their consumer is presumed dead) are claimed (XAUTOCLAIM)."""
    max_deliveries: int = Field(10, ge=1)
    """An entry delivered this many times (it keeps killing consumers) is dead-lettered."""
    recent_plays: int = Field(50, ge=1)
    """Most recent plays kept per user in the online list."""


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
    ray_workers: int = Field(2, ge=0)
    """Ray actors that solve ALS half-steps (each owns a shard of users and items); 0 fits in
    the job's driver process instead."""
    ray_cpus_per_worker: float = Field(0.5, ge=0)
    """CPUs each ALS actor reserves: 1 on a dedicated cluster; a fraction on a small machine
    where CF shares cores with the content and trending jobs."""
    block_size: int = Field(4096, ge=1)
    """Rows per call of the compiled ALS CG kernel inside a worker; does not change the result."""
    eval_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of interactions held out (protocol a) to measure the model before publishing;
    its metrics go into the manifest. 0 skips the evaluation fit."""


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
    crash_retries: int = Field(3, ge=0)
    """Times a batch whose extraction actor died (a decoder crashing in native code, a lost
    node) is retried on the restarted actor before it is set aside; its tracks are then
    analysed one per batch, one batch per actor at a time (so a track queued behind the
    culprit on its actor is not blamed), and one bad file costs only itself
    (jobs/embed_content.py `extract_audio`). Raise it on preemptible nodes."""
    catalog_path: Path | None = None
    """Track catalogue Parquet (track_id, audio_path, artist_id, album, genres, release_year,
    duration_ms, explicit). None: the simulated world's tracks.parquet."""
    fit_sample_size: int = Field(20000, ge=1)
    """Most tracks the scaler and PCA are fitted on (a seeded random sample); all are embedded."""


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
    baseline: Literal["recent", "day_of_week"] = "recent"
    """`recent`: the baseline_hours just before the window. `day_of_week`: the same hours of
    the week as the window, baseline_weeks weeks back (weekly rhythms cancel out)."""
    baseline_weeks: int = Field(1, ge=1)
    """Weeks of history in day_of_week mode (the job then reads that many weeks of events)."""
    prior_plays: float = Field(3.0, gt=0)
    """Weight of the catalogue prior in pseudo-plays: how much a track without history is
    assumed to play like an average track."""
    false_trends_per_run: float = Field(0.002, gt=0)
    """Nominal expected false trends per run (Bonferroni budget): sets the significance a
    track needs. Real plays have heavier tails than the model, so the measured rate is higher
    (0.002 gave about 0.3 false trends per run on simulated worlds; see benchmarks/trending.py)."""
    smoothing_half_life_hours: float = Field(6.0, ge=0)
    """Half-life of the exponential smoothing of scores across runs (0: no smoothing)."""
    max_per_artist: int = Field(2, ge=1)
    """Most tracks by one artist in a trending list."""
    max_per_genre: int = Field(10, ge=1)
    """Most tracks of one genre in the global and per-locale lists."""
    category_caps: dict[str, int] = Field(
        default_factory=lambda: {"music": 50, "podcast": 5, "audiobook": 5, "other": 5}
    )
    """Most tracks per category in a list; categories not listed use the `other` cap."""
    ttl_s: int = Field(2 * 24 * 3600, ge=60)
    """Lifetime of the published Redis lists: stale trends vanish if the job stops running."""


SOURCES = ("cf", "content", "trending", "new_releases", "popular")
"""Candidate sources the serving DAG knows; any other name in the config is an error."""


def _check_sources(names, where: str) -> None:
    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown candidate source(s) {unknown} in {where}; known: {list(SOURCES)}")


class ServingSettings(Strict):
    candidates: int = Field(200, ge=1)
    """Candidates pulled from each source before blending."""
    source_weights: dict[str, float] = Field(
        default_factory=lambda: {"cf": 1.0, "content": 0.5, "trending": 0.2, "new_releases": 0.1, "popular": 0.1}
    )
    """Blend weight per candidate source (casual listeners, and any segment not listed below)."""
    segment_weights: dict[Literal["new", "casual", "heavy"], dict[str, float]] = Field(
        default_factory=lambda: {
            "new": {"cf": 0.3, "content": 0.8, "trending": 0.5, "new_releases": 0.2, "popular": 0.4},
            "heavy": {"cf": 1.0, "content": 0.3, "trending": 0.1, "new_releases": 0.1, "popular": 0.05},
        }
    )
    """Blend weights for a user segment, replacing source_weights for it: new listeners lean on
    content and trending, heavy listeners on CF."""
    casual_from_plays: int = Field(5, ge=0)
    """Plays from which a listener counts as casual rather than new."""
    heavy_from_plays: int = Field(100, ge=1)
    """Plays from which a listener counts as heavy."""
    recency_weight: float = Field(0.15, ge=0)
    """Weight of the recency boost added to the blended score."""
    recency_half_life_days: float = Field(30.0, gt=0)
    """Age at which a track's recency boost has halved."""
    new_release_days: float = Field(30.0, gt=0)
    """Tracks released within this many days form the new_releases source."""
    mmr_lambda: float = Field(0.8, ge=0, le=1)
    """MMR trade-off: 1 is pure relevance, 0 pure diversity."""
    artist_cap: int = Field(2, ge=1)
    """Most tracks by one artist in a response."""
    genre_max_share: float = Field(0.8, gt=0, le=1)
    """Genre balance: at most this share of a response from one genre."""
    heard_filter_days: float = Field(30.0, ge=0)
    """Tracks the user played within this many days are not recommended."""
    fallback_chain: list[str] = Field(default_factory=lambda: ["cf", "content", "trending", "new_releases", "popular"])
    """Sources in order of preference; when the blend yields fewer than k tracks, the list is
    filled from them in this order. Every name must be a known source."""
    recent_plays: int = Field(20, ge=0)
    """Recent plays kept per user for content neighbours and freshness."""
    fresh_play_weight: float = Field(3.0, gt=0)
    """Weight of a play since the last training in the request-time fold-in, relative to a
    play in the trained history: the current session counts for more."""
    max_k: int = Field(200, ge=1)
    """Largest k a client may ask for."""
    reload_interval_s: float = Field(10.0, gt=0)
    """How often a replica checks for newly published model versions and feature
    materialisations, on a background thread (app/refresh.py): requests never wait for it."""
    request_batch_size: int = Field(32, ge=1)
    """Most recommendation requests the ingress sends down the DAG as one batch: each stage
    then costs one Serve call per batch instead of one per request. Only a backlog fills a
    batch, so the cap matters only at saturation: same cluster, two rounds, 32 against 16 gave
    689-733 against 606-623 req/s with 128 closed-loop clients and 599-600 against 614-639
    with 64."""
    request_batches_in_flight: int = Field(3, ge=1)
    """Batches travelling the DAG at once per ingress replica. Requests arriving while all are
    busy wait and leave together in the next batch: at low load every request goes alone at
    once, under load batches grow with the backlog. Three kept 2 cores busier than two while a
    batch is between stages (same cluster, 64 closed-loop clients, three rounds: 571-604
    against 446-571 req/s); four made the batches smaller without filling the cores more."""
    request_congestion_threshold: float | None = Field(1.0, ge=1.0)
    """Fewer batches in flight (down to one) while the batches' latency says more than this many
    batches' worth of the work in flight is waiting for a core, more again under half of it
    (TCP Vegas's rule, app/batching.py CongestionLimit): requests that wait for the next batch
    then cost fewer Serve calls than requests that go alone. At least 1, so that a batch out
    alone never closes a slot. null: always `request_batches_in_flight`. On a 2-core machine
    2.5x slower than usual, A/B of 1.0 against null on one cluster (benchmarks/ab.py, 6 rounds
    of 10 s): at 50 req/s, where the cores are full, p95 86.6 against 130.6 ms (ratio 0.663,
    interval 0.61-0.75); at 20 req/s, with room to spare, 42.3 against 45.5 ms (0.929, interval
    0.88-1.03): no cost at low load."""

    @model_validator(mode="after")
    def _known_sources(self) -> "ServingSettings":
        _check_sources(self.source_weights, "serving.source_weights")
        for segment, weights in self.segment_weights.items():
            _check_sources(weights, f"serving.segment_weights.{segment}")
        _check_sources(self.fallback_chain, "serving.fallback_chain")
        if self.heavy_from_plays <= self.casual_from_plays:
            raise ValueError("serving.heavy_from_plays must be above casual_from_plays")
        return self

    def weights_for(self, segment: str) -> dict[str, float]:
        return self.segment_weights.get(segment, self.source_weights)


def variant_weights(base: ServingSettings, overrides: dict) -> dict:
    """`overrides` with an experiment variant's `source_weights` read as changes to the weights
    it names, for every segment; the sources it does not name keep their configured weights.
    Taken literally, a variant's weights replaced `source_weights` only, which the configured
    `segment_weights` override for new and heavy listeners: only casual ones saw the variant
    while all were counted as treated, and a source it left out (new_releases) lost its weight.
    `segment_weights` given as well (as the flags give them) replace the segments' weights whole."""
    changed = overrides.get("source_weights")
    if not changed:
        return overrides
    merged = {**overrides, "source_weights": {**base.source_weights, **changed}}
    merged.setdefault("segment_weights", {segment: {**w, **changed} for segment, w in base.segment_weights.items()})
    return merged


PROJECT_ROOT = Path(__file__).resolve().parents[1]


class FeatureStoreSettings(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    repo_dir: Path = Path("feature_repo")
    """Folder of feature-view YAML files; relative paths are relative to the project root."""
    write_concurrency: int = Field(2, ge=1)
    """Ray Data writer tasks materialising into Redis at once (bounds the load on Redis)."""
    write_batch_size: int = Field(500, ge=1)
    """Rows per pipelined write."""
    snapshot_entries: int = Field(10_000, ge=0)
    """Reads each serving replica remembers for degraded mode (Redis unreachable): a user's
    profile, recent plays and preferences are three."""
    outage_retry_s: float = Field(1.0, gt=0)
    """After a failed online read, serving replicas answer from their snapshot for this long
    before trying Redis again: a hung Redis then costs one socket timeout per interval, not
    one per request."""
    old_namespace_grace_s: int = Field(600, ge=0)
    """Seconds a replaced namespace stays readable after the switch, for in-flight readers."""
    parity_sample: int = Field(200, ge=1)
    """Entities per view the parity check compares online against offline."""

    @field_validator("repo_dir")
    @classmethod
    def _resolve(cls, value: Path) -> Path:
        return value if value.is_absolute() else PROJECT_ROOT / value


class WebSettings(Strict):
    """The PWA served under /app and its demo sign-in."""

    demo_sign_in: bool = False
    """Let anyone get a short-lived ingest+read API key for a listener id (POST
    /v1/web/sign-in), rate limited per client address like an admin key. For local demos only;
    on a shared network hand out keys with `echotune keys create` instead."""
    demo_key_ttl_s: int = Field(24 * 3600, ge=60)
    """Lifetime of a key minted by the demo sign-in; the key record expires in Redis."""


class PushSettings(Strict):
    """Web push (RFC 8030/8291/8292): subscriptions in Redis, `jobs.notify` sends."""

    vapid_key_path: Path | None = None
    """PEM file of the VAPID private key (`echotune push keys` creates it). None:
    `<paths.state_dir>/push/vapid_private.pem`."""
    vapid_subject: str = Field("mailto:ops@echotune.invalid", pattern=r"^(mailto:|https://)")
    """Contact the push services see in the VAPID claims (`sub`): a mailto: or https: URL."""
    endpoint_hosts: list[str] = Field(
        default_factory=lambda: ["fcm.googleapis.com", "push.services.mozilla.com", "notify.windows.com", "push.apple.com"]
    )
    """Hosts (or parent domains) a subscription endpoint may point at: the server POSTs to
    it, so an open list would let anyone aim the notifier at internal addresses. https only,
    except for loopback hosts listed here (tests)."""
    max_subscriptions_per_user: int = Field(10, ge=1)
    """Devices one listener may subscribe; the oldest is replaced beyond this."""
    max_per_day: int = Field(2, ge=0)
    """Frequency cap: notifications one listener receives in any 24 hours (all devices count once)."""
    min_interval_s: int = Field(4 * 3600, ge=0)
    """Frequency cap: least time between two notifications to one listener."""
    quiet_start_hour: int = Field(22, ge=0, le=23)
    """Quiet hours start (local hour in the listener's time zone): nothing is sent from here..."""
    quiet_end_hour: int = Field(8, ge=0, le=23)
    """...until this local hour. Equal start and end: no quiet hours."""
    trending_depth: int = Field(10, ge=1)
    """How far down a genre's trending list a track counts as "new trending in your genre"."""
    message_ttl_s: int = Field(24 * 3600, ge=0)
    """How long a push service keeps an undelivered message (the `TTL` header)."""
    request_timeout_s: float = Field(10.0, gt=0)
    """Timeout of one request to a push service."""


class ExperimentSettings(Strict):
    """Online experiments: assignment in the serving path and the evaluator's statistics."""

    refresh_interval_s: float = Field(2.0, gt=0)
    """How often a replica re-reads experiment definitions and kill switches: a stopped
    experiment or rolled-back variant stops being assigned within about this long."""
    log_exposures: bool = True
    """Append an impression event per recommended track (with experiment and variant) for
    users in an experiment; the evaluator counts exposures from these."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """Significance level of the evaluator's tests and confidence intervals (1 - alpha)."""
    correction: Literal["holm", "bh"] = "holm"
    """Multiplicity correction across an experiment's metrics: Holm (family-wise error) or
    Benjamini-Hochberg (false discovery rate)."""
    pre_period_days: float = Field(7.0, ge=0)
    """Days before a user's first exposure used as the CUPED covariate (0: no CUPED)."""
    srm_p_value: float = Field(0.001, gt=0, lt=1)
    """A sample-ratio chi-square p-value below this flags the split as untrustworthy."""
    auto_rollback: bool = True
    """The evaluator sets a variant's kill switch in Redis when a critical guardrail breaks."""


class FlagSettings(Strict):
    """Feature flags (the seed's ENABLE_* switches). Each says what happens when it is off;
    all are on by default. Serve reads them at deploy time (`serve deploy` with the edited file
    rolls the replicas), jobs at start."""

    feedback_events: bool = True
    """ENABLE_FEEDBACK_EVENTS. Off: POST /v1/events answers 503 with a message naming this
    flag and stores nothing (503, not 404, so client outboxes keep the events and replay them
    once the flag is back on)."""
    hybrid_reco: bool = True
    """ENABLE_HYBRID_RECO. Off: recommendations are not personalised: only the trending and
    popular sources are blended (CF, content and new releases get weight 0), still with the
    heard filter, blocks and diversity re-ranking."""
    trending_detection: bool = True
    """ENABLE_TRENDING_DETECTION. Off: `jobs.pipeline` skips the trending job and GET
    /v1/trending answers 503 naming this flag; lists already published expire after
    `trending.ttl_s`, and the last trending artifact keeps feeding popularity."""
    experiment_evaluation: bool = True
    """ENABLE_EXPERIMENT_EVALUATION. Off: `jobs.evaluate_experiment` evaluates nothing and
    rolls nothing back (it reports `skipped`); assignment and exposure logging go on."""


class Settings(Strict):
    """Everything under `applications[name=echotune].args`."""

    redis: RedisSettings = RedisSettings()
    paths: PathSettings = PathSettings()
    world: WorldSettings = WorldSettings()
    gateway: GatewaySettings = GatewaySettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    cf: CFSettings = CFSettings()
    content: ContentSettings = ContentSettings()
    trending: TrendingSettings = TrendingSettings()
    serving: ServingSettings = ServingSettings()
    features: FeatureStoreSettings = FeatureStoreSettings()
    web: WebSettings = WebSettings()
    push: PushSettings = PushSettings()
    experiments: ExperimentSettings = ExperimentSettings()
    flags: FlagSettings = FlagSettings()


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
