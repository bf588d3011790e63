"""A reload refuses any candidate bundle it cannot serve, and the old bundle keeps serving.

The candidates are the hard case: each file of a trained bundle in turn is corrupted (cut to half
its length, or replaced by random bytes of the same length) and the manifest is then written
again, so its checksums match and only loading (or answering) can tell. Known answer: every
candidate is refused with ``BundleError`` (HTTP 409), except those whose corrupt file is a
training report no serving code reads, and the old model_version answers throughout.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from data.errors import BundleError
from pipeline.bundle import MANIFEST_NAME, write_manifest
from pipeline.bundle_check import BundleChecker, _death, check_bundle
from pipeline.feedback_log import FeedbackLog, FeedbackLogConfig
from pipeline.funnel import RecommendRequest
from pipeline.service import RecommenderService
from ranking.stage import RankingStage
from serving.app import create_app
from serving.settings import ServiceSettings

# Written by training for people (learning curves, feature importance, stage wall times), read
# by no loader: a corrupt one may be served.
REPORT_FILES = {
    "ranking/model/curves.json",
    "ranking/model/curves.png",
    "ranking/model/importance.json",
    "retrieval/two_tower/curves.json",
    "retrieval/two_tower/curves.png",
    "timings.json",
}
TOKEN = "reload-fuzz-admin-token"


def corrupt_copy(bundle: Path, name: str, mode: str, out: Path, seed: int = 0) -> Path:
    """A copy of ``bundle`` whose file ``name`` is corrupted, with a manifest that matches."""
    shutil.copytree(bundle, out)
    target = out / name
    data = target.read_bytes()
    if mode == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        target.write_bytes(random.Random(seed).randbytes(len(data)))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    (out / MANIFEST_NAME).unlink()
    write_manifest(
        out, config=manifest["config"], dataset_fingerprint=manifest["dataset_fingerprint"]
    )
    return out


def bundle_files(bundle: Path) -> list[str]:
    return sorted(
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    )


def assert_serves(service: RecommenderService, version: str) -> None:
    answer = service.pipeline.recommend([RecommendRequest("someone", k=5)])[0]
    assert answer.model_version == version
    assert len(answer.item_ids) == 5 and not answer.degraded


@pytest.fixture
def service(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> Iterator[RecommenderService]:
    _, bundle = tiny_bundle
    with FeedbackLog(FeedbackLogConfig(path=tmp_path / "feedback.sqlite3")) as log:
        served = RecommenderService(bundle, log, enforce_budgets=False)
        yield served
        served.close()


@pytest.mark.slow
def test_every_corrupt_file_is_refused_and_the_old_bundle_serves(
    tiny_bundle: tuple[Path, Path], service: RecommenderService, tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    version = service.pipeline.model_version
    files = bundle_files(bundle)
    assert len(files) > 30
    accepted, refusals = [], {}
    for index, name in enumerate(files):
        for mode in ("truncate", "garbage"):
            candidate = corrupt_copy(bundle, name, mode, tmp_path / f"c{index}-{mode}", seed=index)
            try:
                new, old = service.reload(candidate)
            except BundleError as exc:
                refusals[name, mode] = str(exc)
                assert str(candidate) in str(exc), "the refusal names the bundle"
                assert service.pipeline.model_version == version
            else:
                accepted.append(name)
                assert old == version
                assert_serves(service, new)
                service.reload(bundle)
            assert_serves(service, version)
            shutil.rmtree(candidate)
    assert set(accepted) <= REPORT_FILES, f"loaded although corrupt: {set(accepted) - REPORT_FILES}"
    # A LightGBM model cut in half aborts the process that parses it: only the child died.
    assert ("ranking/model/model.txt", "truncate") in refusals


def test_a_corrupt_candidate_is_a_409_over_http(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    settings = ServiceSettings(
        bundle=bundle, feedback_db=tmp_path / "feedback.sqlite3", admin_token=SecretStr(TOKEN)
    )
    candidate = corrupt_copy(
        bundle, "retrieval/two_tower/index/index.faiss", "truncate", tmp_path / "c"
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(settings)) as client:
        before = client.post("/v1/recommend", json={"user_id": "u", "k": 3}).json()["model_version"]
        refused = client.post("/admin/reload", json={"bundle": str(candidate)}, headers=auth)
        assert refused.status_code == 409, refused.text
        assert (
            "index.faiss" in refused.json()["error"] or "faiss" in refused.json()["error"].lower()
        )
        after = client.post("/v1/recommend", json={"user_id": "u", "k": 3})
        assert after.status_code == 200 and after.json()["model_version"] == before


def test_a_stage_that_fails_its_smoke_request_refuses_the_bundle(
    tiny_bundle: tuple[Path, Path], service: RecommenderService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage that raises degrades a served answer; on a candidate it refuses the bundle (at a
    reload, and at start-up)."""
    _, bundle = tiny_bundle
    version = service.pipeline.model_version

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("feature table out of shape")

    with monkeypatch.context() as patch:
        patch.setattr(RankingStage, "score", broken)
        with pytest.raises(BundleError, match="ranking:error.*feature table out of shape"):
            check_bundle(bundle)
        # The child process is not patched: the service's own smoke request refuses it.
        with pytest.raises(BundleError, match="ranking:error.*feature table out of shape"):
            service.reload(bundle)
        assert service.pipeline.model_version == version
        with pytest.raises(BundleError, match="ranking:error"):
            RecommenderService(bundle, service.feedback, check_reloads_in_child=False)
    assert_serves(service, version)


def test_the_checker_replaces_a_dead_child_and_names_a_crash() -> None:
    assert "killed by SIGABRT" in _death(-6) and "status 3" in _death(3)
    checker = BundleChecker(idle_s=30)
    missing = "/nonexistent/bundle"
    try:
        with pytest.raises(BundleError, match="does not exist"):
            checker.check(missing)
        child = checker._child[0]
        assert child is not None and child.poll() is None, "a refusal keeps the child"
        child.kill()
        child.wait()
        with pytest.raises(BundleError, match="does not exist"):
            checker.check(missing)  # answered by a new child
        assert checker._child[0] is not None and checker._child[0].pid != child.pid
    finally:
        checker.close()
    assert checker._child[0] is None


@pytest.mark.parametrize("path", ["b" * 300, "bundle\x00"])
def test_a_path_the_os_refuses_is_a_refusal_not_an_error(
    service: RecommenderService, path: str
) -> None:
    version = service.pipeline.model_version
    with pytest.raises(BundleError, match="cannot be read|does not exist"):
        service.reload(path)
    assert service.pipeline.model_version == version


def test_the_reloaded_path_is_logged_escaped(
    tiny_bundle: tuple[Path, Path],
    service: RecommenderService,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, bundle = tiny_bundle
    odd = tmp_path / "new\nline\x1b"
    shutil.copytree(bundle, odd)
    with caplog.at_level("INFO", logger="pipeline.service"):
        service.reload(odd)
    [line] = [r.getMessage() for r in caplog.records if "reloaded bundle" in r.getMessage()]
    assert "\n" not in line and "\x1b" not in line and "new\\nline\\x1b" in line
