"""Child processes the driver starts (`_util/procs.py`): a terminated driver stops them and starts none."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from opensci_patch._util import procs
from opensci_patch._util.errors import Terminated


def test_a_terminated_driver_stops_a_running_installer_and_starts_none(tmp_path: Path, monkeypatch):
    """Seen: SIGTERM to `opensci-patch cell` while its threads built envs left the uv installs running to the end
    (the driver waited for them). The installers are now live children like the workers."""
    monkeypatch.setattr(procs, "STOPPING", threading.Event())
    raised: list[BaseException] = []

    def install() -> None:
        try:
            procs.run_installer([sys.executable, "-c", "import time; time.sleep(120)"], tmp_path, "tf-test")
        except BaseException as exc:  # noqa: BLE001 - what the env-building thread would see
            raised.append(exc)

    thread = threading.Thread(target=install)
    start = time.monotonic()
    thread.start()
    while not procs.LIVE and time.monotonic() - start < 30:
        time.sleep(0.05)
    assert procs.LIVE, "the installer never registered as a live child"
    procs.terminate_children()
    thread.join(60)
    assert not thread.is_alive() and time.monotonic() - start < 60
    assert [type(e) for e in raised] == [Terminated] and not procs.LIVE
    marker = tmp_path / "ran"
    with pytest.raises(Terminated):  # and none starts after it
        procs.run_installer([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], tmp_path, "tf-test")
    assert not marker.exists()
