"""Cold start: a content embedding and content neighbours for a track the batch job never saw.

Uses the published `content` artifact as it is: the same analysis code (`analyse_tracks`),
the same feature assembly (`content_features`), the fitted scaler/PCA, the genre vocabulary
and the artist popularity the batch run used. A track embedded here therefore gets exactly the
vector it would have got had it been in the catalogue when the job ran (with the same fit).

    model = ContentModel.from_artifact(ArtifactStore(settings.paths.artifacts_dir).latest("content"))
    result = model.embed_track({"track_id": "new-1", "audio_path": "/music/new.ogg", "genres": ["rock"],
                                "artist_id": "a1", "release_year": 2024, "duration_ms": None, "explicit": False})
    model.neighbours(result.embedding, k=10)   # [(track_id, cosine), ...]

Decoding and analysis cost about a quarter of a CPU-second per 30 s of Opus, so an ingest
path should call this off the request thread (or in a Ray task), once per new track.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from app.artifacts import Artifact
from app.data.audio_catalog import normalise_catalog
from training.content import AUDIO_FEATURE_VERSION, ContentEmbedder, analyse_tracks, content_features, fill_missing_audio


@dataclass(frozen=True)
class ColdStartEmbedding:
    track_id: str
    embedding: np.ndarray  # unit-norm float32, comparable with the artifact's embeddings.npy
    audio_ok: bool
    error_reason: str | None  # why the audio could not be used (then the embedding is metadata-only)
    key: str | None
    tempo_bpm: float


@dataclass
class ContentModel:
    embedder: ContentEmbedder
    genres: list[str]
    artist_popularity: dict[str, float]
    sample_rate: int
    max_seconds: float
    track_ids: np.ndarray
    embeddings: np.ndarray
    version: str = ""

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> "ContentModel":
        manifest = artifact.manifest
        missing = [k for k in ("genre_vocabulary", "analysis") if k not in manifest]
        if missing:
            raise ValueError(f"content artifact {artifact.version} predates cold start: manifest lacks {missing}")
        version = manifest["analysis"].get("feature_version", 1)
        if version != AUDIO_FEATURE_VERSION:
            raise ValueError(
                f"content artifact {artifact.version} has audio features of version {version}, this code computes "
                f"version {AUDIO_FEATURE_VERSION}: re-run jobs.embed_content so new tracks are embedded like the catalogue"
            )
        artists = pd.read_parquet(artifact.file("artists.parquet"))
        return cls(
            embedder=ContentEmbedder.load(artifact.file("embedder.npz")),
            genres=list(manifest["genre_vocabulary"]),
            artist_popularity=dict(zip(artists["artist_id"], artists["artist_popularity"].astype(float))),
            sample_rate=int(manifest["analysis"]["sample_rate"]),
            max_seconds=float(manifest["analysis"]["max_seconds"]),
            track_ids=pd.read_parquet(artifact.file("tracks.parquet"), columns=["track_id"])["track_id"].to_numpy(dtype=object),
            embeddings=np.load(artifact.file("embeddings.npy")),
            version=artifact.version,
        )

    def embed_track(self, track: Mapping[str, Any]) -> ColdStartEmbedding:
        """Embed one catalogue-shaped record (same columns and aliases the job accepts).

        Bad audio does not raise: like the batch job, the track gets a metadata-only embedding
        and `error_reason` says why. A record without a track id or audio column raises
        ValueError naming the field.
        """
        tracks, rejected = normalise_catalog(pd.DataFrame([dict(track)]))
        if not rejected.empty:
            raise ValueError(f"track rejected: {rejected['reason'].iloc[0]}")
        analysis = analyse_tracks(tracks, self.sample_rate, self.max_seconds)
        features, _, audio_ok = content_features(tracks, analysis, self.genres, self.artist_popularity)
        vector = self.embedder.transform(fill_missing_audio(features, audio_ok, self.embedder))[0]
        row = analysis.iloc[0]
        return ColdStartEmbedding(
            track_id=str(tracks["track_id"].iloc[0]),
            embedding=vector,
            audio_ok=bool(audio_ok[0]),
            error_reason=row["error_reason"],
            key=row["key"],
            tempo_bpm=float(row["tempo_bpm"]),
        )

    def neighbours(self, embedding: np.ndarray, k: int = 10, exclude: str | None = None) -> list[tuple[str, float]]:
        """The k catalogue tracks with the highest cosine similarity (embeddings are unit-norm)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = self.embeddings @ np.asarray(embedding, dtype=np.float32)
        if exclude is not None:
            scores = np.where(self.track_ids == exclude, -np.inf, scores)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(str(self.track_ids[i]), float(scores[i])) for i in top if np.isfinite(scores[i])]


def embed_track(track: Mapping[str, Any], artifact: Artifact) -> ColdStartEmbedding:
    """One-off convenience; a caller embedding many tracks should keep a ContentModel."""
    return ContentModel.from_artifact(artifact).embed_track(track)
