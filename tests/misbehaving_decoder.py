"""A decode function for pool tests: a marked study hangs or kills its process.

Kept in its own small module because a spawned pool process imports the module that
names its function; importing the test module would pull in torch and the app.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from triage_api.decoding import Decoded, DecodeTask, decode_study

HANG, CRASH = b"HANG-ON-DECODE", b"CRASH-ON-DECODE"


def decode_or_misbehave(task: DecodeTask) -> Decoded:
    """:func:`decode_study`, except that a study carrying a marker hangs or crashes the process."""
    data = Path(task.path).read_bytes()
    if HANG in data:
        time.sleep(3600)
    if CRASH in data:
        os._exit(70)
    return decode_study(task)
