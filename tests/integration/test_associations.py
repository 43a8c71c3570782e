"""Who may talk to radlens: echo, called/calling AE title checks, association limit."""

from __future__ import annotations

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.helpers import TEST_FILES, echoscu, radlens_cli, storescu, wait_for


@pytest.fixture
def server(server_factory):
    """These tests are about the door: the agent loads no model (a model costs each agent
    seconds of CPU, and nothing here is analysed)."""
    return server_factory(RADLENS_MODEL__ENABLED="false").start()


def test_echoscu_succeeds(server):
    result = echoscu(server.port)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_wrong_called_ae_title_is_rejected(server):
    result = echoscu(server.port, called_aet="NOT_RADLENS")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    # The listener keeps serving after a rejection.
    assert echoscu(server.port).returncode == 0


def test_calling_ae_title_outside_allowlist_is_rejected(server_factory):
    server = server_factory(RADLENS_DICOM__ALLOWED_CALLING_AETS='["MODALITY1", "PACS"]',
                            RADLENS_MODEL__ENABLED="false").start()
    refused = echoscu(server.port, calling_aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    allowed = echoscu(server.port, calling_aet="MODALITY1")
    assert allowed.returncode == 0, allowed.stderr
    stored = storescu(server.port, [TEST_FILES / "CT_small.dcm"], calling_aet="INTRUDER")
    assert stored.returncode != 0
    assert server.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert "association rejected" in server.log()


def test_association_limit(server_factory):
    # pynetdicom holds a slot for a bare TCP connection (our readiness probe) until the ACSE
    # timeout, even after the peer closed it: keep that timeout short here.
    server = server_factory(RADLENS_DICOM__MAX_ASSOCIATIONS="1", RADLENS_MODEL__ENABLED="false",
                            RADLENS_DICOM__ACSE_TIMEOUT_S="2").start()
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)

    def associate():
        # The readiness probe's connection may still count for a moment after start-up.
        assoc = ae.associate("127.0.0.1", server.port, ae_title="RADLENS")
        return assoc if assoc.is_established else None

    held = wait_for(associate, 10, "the single association slot", interval=0.3)
    try:
        refused = echoscu(server.port)
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr
    finally:
        held.release()
    assert echoscu(server.port).returncode == 0


def test_radlens_echo_command(server):
    ok = radlens_cli("echo", "127.0.0.1", str(server.port), "RADLENS")
    assert ok.returncode == 0, ok.stderr
    assert "Success" in ok.stdout
    wrong = radlens_cli("echo", "127.0.0.1", str(server.port), "WRONG")
    assert wrong.returncode == 1
    assert "rejected" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_a_second_agent_on_the_same_data_folder_is_refused(server, server_factory):
    second = server_factory(RADLENS_MODEL__ENABLED="false")
    second.data_dir = server.data_dir
    second.start(wait=False)
    assert second.process.wait(timeout=60) == 1
    log = second.log()
    assert f"another radlens agent (pid {server.process.pid}) is using" in log
    assert echoscu(server.port).returncode == 0  # the first one is untouched
