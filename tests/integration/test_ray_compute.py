"""The model stage in Ray actors (``compute.backend: ray``) on a real Ray head on loopback: the
agent's results equal those of the model in process, and a model actor killed with SIGKILL in
the middle of a job costs one retry, not the study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from radlens.models.cards import model_folder
from tests.helpers import frames_of, free_port, storescu, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[str]:
    ray = str(Path(sys.executable).parent / "ray")  # the CLI beside this interpreter
    port = free_port()
    temp = Path("/tmp") / f"rl{port}"  # Ray's socket paths must stay short
    started = subprocess.run(
        [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
         "--temp-dir", str(temp)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def _clip(folder: Path, frames: int, seed: int) -> Path:
    from radlens.tasks.breast_us.dicom import us_multiframe_dataset
    from radlens.tasks.breast_us.phantoms import make_phantom

    images = np.stack([make_phantom(seed, i, label="malignant" if i % 2 else "benign").image
                       for i in range(frames)])
    ds = us_multiframe_dataset(images, study_uid=generate_uid(), series_uid=generate_uid(),
                               instance_number=1, spacing_cm=0.02, patient_id=f"RAY{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"clip{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _summary(findings: dict) -> list[tuple]:
    (image,) = findings["images"]
    return [(p["frame"], p["predicted_class"], len(p["lesions"]), sorted(p["saliency"]),
             round(p["class_probabilities"]["malignant"], 3)) for p in frames_of(image)]


def test_the_model_stage_on_ray_matches_in_process_and_survives_its_actor(
        ray_head, server_factory, tmp_path):
    import ray

    clip = _clip(tmp_path / "in", 6, seed=4)
    local = server_factory().start()
    assert storescu(local.port, [clip]).returncode == 0
    wait_for(lambda: len(local.jobs_done()) == 1, 180, "the in-process job")
    study = str(pydicom.dcmread(clip, stop_before_pixels=True).StudyInstanceUID)
    expected = _summary(local.findings(study))
    assert local.stop() == 0

    server = server_factory(RADLENS_COMPUTE__BACKEND="ray",
                            RADLENS_COMPUTE__RAY_ADDRESS=ray_head,
                            RADLENS_COMPUTE__RAY_NAMESPACE=f"t{os.getpid()}").start()
    assert storescu(server.port, [clip]).returncode == 0
    wait_for(lambda: len(server.jobs_done()) == 1, 240, "the job on Ray")
    assert server.jobs_done()[0]["state"] == "done", server.log()[-3000:]
    assert _summary(server.findings(study)) == expected
    assert "model stage on Ray" in server.log()

    # SIGKILL the model actor while it works on a long clip: the job fails once, Ray
    # restarts the actor, and the retry answers.
    ray.init(address=ray_head, namespace=f"t{os.getpid()}", log_to_driver=False)
    try:
        card = json.loads((model_folder("default") / "card.json").read_text())
        actor = ray.get_actor(f"radlens-model-{card['name']}-{card['version']}-0")
        victim = ray.get(actor.pid.remote())
        long_clip = _clip(tmp_path / "long", 64, seed=5)
        assert storescu(server.port, [long_clip]).returncode == 0
        wait_for(lambda: server.query("SELECT COUNT(*) FROM jobs WHERE state = 'running'")[0][0]
                 == 1, 60, "the long job to start")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(server.jobs_done()) == 2, 300, "the long job, on a new actor")
        job = server.query("SELECT state, attempts, error FROM jobs ORDER BY id DESC")[0]
        # Killed during a call, the attempt fails and the retry answers; killed between two
        # calls, Ray holds the next one until the actor is back. Either way: done, once.
        assert job["state"] == "done" and job["attempts"] in (1, 2), dict(job)
        long_study = str(pydicom.dcmread(long_clip, stop_before_pixels=True).StudyInstanceUID)
        (image,) = server.findings(long_study)["images"]
        assert len(frames_of(image)) + len(image["abstained"]) == 64
        assert ray.get(actor.pid.remote()) != victim  # restarted
    finally:
        ray.shutdown()
    assert server.stop() == 0
