"""The startup report a replica logs: its constructor time and the age of its process."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from services.runtime.replica import process_age_s, reports_startup


def test_process_age_counts_from_the_process_start():
    code = "import time; time.sleep(0.5); from services.runtime.replica import process_age_s; print(process_age_s())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= age < 30  # at least its own sleep, and not the age of the machine


def test_reports_startup_logs_the_constructor_time(caplog):
    class Stage:
        @reports_startup
        def __init__(self, delay: float):
            time.sleep(delay)
            self.delay = delay

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        stage = Stage(0.2)
    assert stage.delay == 0.2
    (record,) = [r for r in caplog.records if "ready" in r.getMessage()]
    constructor_s = float(record.getMessage().split("constructor ")[1].split(" s")[0])
    assert 0.2 <= constructor_s < 5
    assert process_age_s() >= constructor_s
