import subprocess
import sys

import pytest
import yaml

from app.config import PROJECT_ROOT
from app.features.registry import RegistryError, check_compatible, load_registry


def write_repo(path, *views):
    path.mkdir(exist_ok=True)
    for view in views:
        (path / f"{view['name']}.yaml").write_text(yaml.safe_dump(view))
    return path


VIEW = {
    "name": "user_profile",
    "entity": "user",
    "version": 1,
    "ttl_s": 60,
    "fields": {"cf_vector": {"type": "float32_vector"}, "n_plays": "int64"},
}


def test_shipped_repo_is_valid():
    registry = load_registry(PROJECT_ROOT / "feature_repo")
    assert {"user_profile", "track_profile"} <= set(registry.views)
    assert registry["user_profile"].fields["cf_vector"].type == "float32_vector"


def test_bad_view_names_file_and_field(tmp_path):
    write_repo(tmp_path, {**VIEW, "fields": {"x": {"type": "complex128"}}})
    with pytest.raises(RegistryError, match=r"user_profile.yaml: fields\.x\.type"):
        load_registry(tmp_path)
    write_repo(tmp_path, {**VIEW, "colour": "red"})
    with pytest.raises(RegistryError, match="colour"):
        load_registry(tmp_path)


def test_unknown_view_is_an_error():
    registry = load_registry(PROJECT_ROOT / "feature_repo")
    with pytest.raises(RegistryError, match="unknown feature view 'nope'"):
        registry["nope"]


def test_adding_a_field_is_compatible(tmp_path):
    old = load_registry(write_repo(tmp_path / "a", VIEW))
    new = load_registry(write_repo(tmp_path / "b", {**VIEW, "fields": {**VIEW["fields"], "extra": "string"}}))
    assert check_compatible(old, new) == []


def test_removing_or_retyping_a_field_needs_a_new_version(tmp_path):
    old = load_registry(write_repo(tmp_path / "a", VIEW))
    removed = load_registry(write_repo(tmp_path / "b", {**VIEW, "fields": {"n_plays": "int64"}}))
    retyped = load_registry(write_repo(tmp_path / "c", {**VIEW, "fields": {**VIEW["fields"], "n_plays": "string"}}))
    bumped = load_registry(write_repo(tmp_path / "d", {**VIEW, "version": 2, "fields": {"n_plays": "string"}}))
    assert "field 'cf_vector' was removed" in check_compatible(old, removed)[0]
    assert "changed type int64 -> string" in check_compatible(old, retyped)[0]
    assert check_compatible(old, bumped) == []


def test_cli_lists_and_describes():
    run = lambda *a: subprocess.run([sys.executable, "-m", "app.cli", "--config", str(PROJECT_ROOT / "ray_config.yaml"), "features", *a], capture_output=True, text=True)
    assert "user_profile" in run("list").stdout
    out = run("describe", "track_profile")
    assert out.returncode == 0 and "embedding" in out.stdout and "float32_vector" in out.stdout
    assert run("describe", "nope").returncode == 2
