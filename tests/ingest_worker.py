"""A tiny consume-and-record loop run as a real subprocess by ``test_ingest_crash.py``.

It plays the learner's part: for each batch it appends the event ids to ``OUT`` and fsyncs (the
"state is durable" step), and only then commits the batch's offsets. Settings come from ``MFLI_*``
environment variables, exactly as a deployed process would get them. ``--slow`` sleeps between
batches so the test can SIGKILL it mid-stream.
"""

from __future__ import annotations

import os
import sys
import time

from mfli.config import load_settings
from mfli.consumers import EventStream


def main(out_path: str, group: str, slow_s: float) -> int:
    settings = load_settings()
    with EventStream(settings, group_id=group, topics=[settings.kafka.events_topic]) as stream, \
            open(out_path, "a", encoding="utf-8") as out:
        while True:
            batch = stream.poll_batch(max_records=200, timeout_ms=500)
            if batch.events:
                out.write("".join(f"{e.event_id}\n" for e in batch.events))
                out.flush()
                os.fsync(out.fileno())
            stream.commit(batch.offsets)
            if batch.records:
                time.sleep(slow_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
